"""MDR comments longer than the ticket system's comment limit arrive whole, split over several comments.

The first part checks the Markdown splitter on its own. The second drives
CommentSync with the memory ticket adapter set to a small limit. The third
runs the engine against the MDR and Jira simulators on loopback, with
Jira's limit of 32,767 UTF-16 code units.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from fixtures_mdr import MDR_CLIENT_ID
from fixtures_sync import SyncHarness
from hostile.scenario import marker_of, run_cycles, utf16_length
from test_comment_policies import offline_settings

from mdr_connector.adapters.jira.adapter import MAX_TEXT_LENGTH, _open_block
from mdr_connector.adapters.mdr.client import CommentPage
from mdr_connector.adapters.mdr.models import Comment, Incident
from mdr_connector.adapters.memory.adapter import MemoryTicketAdapter
from mdr_connector.connector import markup
from mdr_connector.connector.comment_parts import SplitError, split_markdown
from mdr_connector.connector.comments import COMMENT, COMMENT_CHANGE, CommentSync, comment_of_part, part_key
from mdr_connector.connector.config import ConnectionSettings
from mdr_connector.connector.engine import ConnectionSync
from mdr_connector.connector.i18n import language
from mdr_connector.connector.mappingfile import CommentFormat, load_mapping
from mdr_connector.connector.store import DONE, MDR_TO_TICKET, Store
from mdr_connector.connector.sync_common import SyncStats
from mdr_connector.connector.tickets import (
    MDR_ORIGIN,
    NOTICE_ORIGIN,
    CommentDraft,
    TicketAccount,
    TicketCapabilities,
    TicketComment,
    TicketDraft,
    TicketFields,
    TicketRef,
)

pytestmark = pytest.mark.asyncio

START = datetime(2026, 12, 4, 10, 0, tzinfo=timezone.utc)
INCIDENT_ID = "2NJMGXkBNGNeZ5iut24S"
CONNECTION_NAME = "SOC Jira sync"
SOC_ANALYST = "Ivan Petrov"
SMALL_LIMIT = 400
JIRA_COMMENT_POST = "POST /rest/api/2/issue/{issue}/comment"


def paragraphs(count: int, words: int = 8) -> list[str]:
    """Return `count` distinct paragraphs of plain words, so every cut can be located."""
    return [f"Paragraph {number} " + " ".join(f"w{number}x{word}" for word in range(words)) for number in range(count)]


def squeezed(text: str) -> str:
    return "".join(text.split())


def part_body(body: str) -> str:
    """Return a part's text without its header and its `Part k of n` line, the first two blocks."""
    return body.split("\n\n", 2)[2]


async def measure_length(text: str) -> int:
    return len(text)


# The splitter


async def test_split_cuts_at_blank_lines() -> None:
    """Parts of paragraphs end at blank lines, fit the limit, and join to the body."""
    body = "\n\n".join(paragraphs(40))

    parts = await split_markdown(body, 300, measure_length)

    assert len(parts) > 1
    assert all(len(part) <= 300 for part in parts)
    assert "\n\n".join(parts) == body


async def test_split_long_word_inside() -> None:
    """One word longer than the limit is cut inside, and the pieces join to the word."""
    body = "y" * 1000

    parts = await split_markdown(body, 300, measure_length)

    assert all(len(part) <= 300 for part in parts)
    assert "".join(parts) == body


async def test_split_reopens_fenced_code() -> None:
    """A fenced code block cut in two is closed in one part and opened again, with its info string, in the next."""
    code = [f"line {number} of the log" for number in range(60)]
    body = "Before the log\n\n```text\n" + "\n".join(code) + "\n```\n\nAfter the log"

    parts = await split_markdown(body, 300, measure_length)

    fenced = [part for part in parts if "```" in part]
    assert len(fenced) > 1
    for part in fenced:
        fences = [line for line in part.split("\n") if line.startswith("```")]
        assert fences[0] == "```text", part[:40]
        assert len(fences) % 2 == 0, part[-40:]
    kept = [line for part in fenced for line in part.split("\n") if line.startswith("line ")]
    assert kept == code


async def test_split_keeps_quote_and_escapes() -> None:
    """A cut inside a quoted line repeats the `>`, and a continuation that would start a list is escaped."""
    quoted = "> " + " ".join(["quoted"] * 80)
    listed = "dash " + " ".join(["- item"] * 80)

    quote_parts = await split_markdown(quoted, 120, measure_length)
    list_parts = await split_markdown(listed, 120, measure_length)

    assert len(quote_parts) > 1
    assert all(part.startswith("> ") for part in quote_parts)
    assert len(list_parts) > 1
    assert all(not part.startswith("- ") for part in list_parts)


async def test_split_measures_rendered_length() -> None:
    """The limit applies to the measured length, here twice the Markdown length, not to the Markdown."""

    async def doubled(text: str) -> int:
        return 2 * len(text)

    body = "\n\n".join(paragraphs(30))

    parts = await split_markdown(body, 400, doubled)

    assert all(2 * len(part) <= 400 for part in parts)
    assert "\n\n".join(parts) == body


async def test_split_rejects_tiny_limit() -> None:
    """A limit below the length of one character raises SplitError instead of looping."""

    async def wide(text: str) -> int:
        return 10 * len(text)

    with pytest.raises(SplitError):
        await split_markdown("abc def", 5, wide)


async def test_part_keys_round_trip() -> None:
    """Part 1 keeps the comment id, and later parts are `<id>/k` that map back to the comment."""
    assert part_key("c1", 1) == "c1"
    assert part_key("c1", 3) == "c1/3"
    assert comment_of_part("c1/3") == ("c1", 3)
    assert comment_of_part("c1") == ("c1", 1)
    assert comment_of_part("c1/x") == ("c1/x", 1)


# CommentSync with the memory adapter and a small limit


class FakeMdr:
    """The comment calls of MdrApi on one in-memory incident, counting each write."""

    def __init__(self) -> None:
        self.comments: list[Comment] = []
        self.writes: Counter[str] = Counter()
        self.list_calls = 0
        self._next_id = 1

    def add_soc_comment(self, text: str) -> Comment:
        comment = Comment(
            comment_id=f"mdr-{self._next_id}",
            author_name=SOC_ANALYST,
            text=text,
            creation_time=int(START.timestamp() * 1000) + self._next_id,
            origin="Service",
        )
        self._next_id += 1
        self.comments.append(comment)
        return comment

    async def list_comments(self, incident_id: str) -> CommentPage:
        self.list_calls += 1
        return CommentPage(items=list(self.comments), malformed=[])

    async def create_comment(self, incident_id: str, text: str, markdown_to_html: bool = True) -> Comment:
        self.writes["create_comment"] += 1
        raise AssertionError(f"nothing should be copied to MDR, but got {text[:80]!r}")

    async def delete_comment(self, comment_id: str) -> None:
        raise AssertionError(f"nothing should be deleted in MDR, but got {comment_id}")


class Crash(BaseException):
    """The process dies: nothing after the write runs, and no error handler catches it."""


class LimitedTickets(MemoryTicketAdapter):
    """The memory adapter with a small comment limit, recording drafts and dying after a chosen write."""

    def __init__(self) -> None:
        super().__init__(clock=lambda: START, capabilities=TicketCapabilities(max_comment_chars=SMALL_LIMIT))
        self.drafts: list[CommentDraft] = []
        self.crash_after_source: str | None = None

    async def add_comment(self, ref: TicketRef, draft: CommentDraft) -> TicketComment:
        self.drafts.append(draft)
        comment = await super().add_comment(ref, draft)
        if draft.marker.source_id == self.crash_after_source:
            self.crash_after_source = None
            raise Crash()
        return comment


class Setup:
    """CommentSync for one incident and its memory ticket, on a SQLite ledger."""

    def __init__(self, store: Store, tickets: LimitedTickets, ref: TicketRef, settings: ConnectionSettings) -> None:
        self.store = store
        self.mdr = FakeMdr()
        self.tickets = tickets
        self.ref = ref
        self.settings = settings
        self.stats = SyncStats()
        self.incident = Incident.model_validate(
            {
                "incident_id": INCIDENT_ID,
                "incident_number": 7,
                "summary": "Suspicious PowerShell",
                "priority": "HIGH",
                "status": "Open",
                "creation_time": int(START.timestamp() * 1000),
                "update_time": int(START.timestamp() * 1000),
            }
        )

    def comment_sync(self, own_account: TicketAccount | None = None, **comments: Any) -> CommentSync:
        """Build a fresh CommentSync, as after a restart. `own_account` plays a service account that changed."""
        mapping = load_mapping("builtin:jira")
        mapping = mapping.model_copy(update={"comments": CommentFormat.model_validate(comments)})
        sync = CommentSync(self.settings, mapping, self.store, self.mdr, self.tickets, self.stats, read_now)
        sync.own_account = own_account or self.tickets.account
        return sync

    async def run(self, times: int = 1, **comments: Any) -> None:
        for _ in range(times):
            await self.comment_sync(**comments).sync_comments(self.incident, self.ref)

    def copies(self) -> dict[str, list[TicketComment]]:
        """Group the ticket's MDR-origin comments by their marker's source id."""
        found: dict[str, list[TicketComment]] = {}
        for comment in self.tickets.comments(self.ref.key):
            if comment.marker is not None and comment.marker.origin == MDR_ORIGIN:
                found.setdefault(comment.marker.source_id, []).append(comment)
        return found

    async def rows(self, kind: str) -> list[Any]:
        return await self.store.get_items(self.settings.name, INCIDENT_ID, kind)


async def read_now(call: Any) -> Any:
    return await call()


@pytest.fixture
async def setup(tmp_path: Path) -> Any:
    settings = offline_settings(tmp_path)
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}")
    tickets = LimitedTickets()
    await tickets.open()
    ref = await tickets.create_ticket(
        TicketDraft(INCIDENT_ID, "SEC", "Task", TicketFields("Incident", "text", "High", ()), {})
    )
    yield Setup(store, tickets, ref, settings)
    await store.close()


def long_html(count: int) -> str:
    return "".join(f"<p>{text}</p>" for text in paragraphs(count))


async def test_memory_split_three_cycles(setup: Setup) -> None:
    """Three reconciliations leave exactly one copy of each part, each within the limit, and done ledger rows."""
    comment = setup.mdr.add_soc_comment(long_html(20))

    await setup.run(times=3)

    copies = setup.copies()
    parts = len(copies)
    assert parts >= 3
    assert sorted(copies) == sorted(part_key(comment.comment_id, part) for part in range(1, parts + 1))
    for source_id, found in copies.items():
        assert len(found) == 1, f"{source_id} has {len(found)} copies"
        assert len(found[0].body) <= SMALL_LIMIT
        assert "Paragraph" in found[0].body, f"{source_id} lost its text"
    ordered = [comment.marker.source_id for comment in setup.tickets.comments(setup.ref.key)]
    assert ordered == [part_key(comment.comment_id, part) for part in range(1, parts + 1)]
    rows = await setup.rows(COMMENT)
    assert {row.source_id for row in rows} == set(copies)
    assert all(row.state == DONE for row in rows)
    assert setup.tickets.writes["add_comment"] == parts
    assert setup.stats.comments_to_ticket == 1
    # One read per reconciliation: no part is taken for a deleted comment that needs a second read.
    assert setup.mdr.list_calls == 3


async def test_memory_parts_carry_header(setup: Setup) -> None:
    """Each part starts with the copy's header and says which part it is, in the process language."""
    setup.mdr.add_soc_comment(long_html(20))

    with language("ru"):
        await setup.run()

    bodies = [comment.body for comment in setup.tickets.comments(setup.ref.key)]
    for number, body in enumerate(bodies, start=1):
        assert body.startswith(f"**{SOC_ANALYST}** (Kaspersky MDR,"), body[:80]
        assert f"_Часть {number} из {len(bodies)}_" in body
    joined = "".join(part_body(body) for body in bodies)
    assert squeezed(joined) == squeezed("".join(paragraphs(20)))


async def test_memory_crash_posts_rest_only(setup: Setup) -> None:
    """After the process dies right after part 2 is written, the next run posts only the parts after it."""
    comment = setup.mdr.add_soc_comment(long_html(20))
    setup.tickets.crash_after_source = part_key(comment.comment_id, 2)

    with pytest.raises(Crash):
        await setup.run()
    pending = {row.source_id: row.state for row in await setup.rows(COMMENT)}
    posted_before = len(setup.tickets.drafts)
    await setup.run(times=2)

    assert posted_before == 2
    assert pending[comment.comment_id] != DONE
    later = [draft.marker.source_id for draft in setup.tickets.drafts[posted_before:]]
    parts = len(setup.copies())
    assert later == [part_key(comment.comment_id, part) for part in range(3, parts + 1)]
    assert all(len(found) == 1 for found in setup.copies().values())
    assert all(row.state == DONE for row in await setup.rows(COMMENT))


async def test_memory_parts_are_echoes(setup: Setup) -> None:
    """No part goes back to MDR: each is an echo by its author, and by the ledger under another account."""
    setup.mdr.add_soc_comment(long_html(20))
    await setup.run()
    part_ids = {comment.id for comment in setup.tickets.comments(setup.ref.key)}

    await setup.run()
    by_author = set(setup.stats.echoes_suppressed)
    setup.stats.echoes_suppressed.clear()
    await setup.run(own_account=TicketAccount(id="new-service-account", display_name="New account"))

    assert setup.mdr.writes["create_comment"] == 0
    assert by_author >= {f"ticket:{comment_id}" for comment_id in part_ids}
    assert set(setup.stats.echoes_suppressed) >= {f"ticket:{comment_id}" for comment_id in part_ids}


async def test_memory_echo_by_marker(setup: Setup, tmp_path: Path) -> None:
    """With the ledger lost and another service account, each part is still an echo by its marker."""
    setup.mdr.add_soc_comment(long_html(20))
    await setup.run()
    part_ids = {comment.id for comment in setup.tickets.comments(setup.ref.key)}
    fresh = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}")
    setup.store = fresh
    setup.stats.echoes_suppressed.clear()
    try:
        sync = setup.comment_sync(own_account=TicketAccount(id="new-service-account", display_name="New account"))
        view = await sync._read_comments(setup.incident, setup.ref)
        failed = await sync.sync_comments_ticket_to_mdr(setup.incident, setup.ref, view)
    finally:
        await fresh.close()

    assert failed == []
    assert setup.mdr.writes["create_comment"] == 0
    assert set(setup.stats.echoes_suppressed) >= {f"ticket:{comment_id}" for comment_id in part_ids}


async def test_memory_mdr_delete_blanks_parts(setup: Setup) -> None:
    """A comment deleted in MDR under `mirror` loses its text in every part."""
    comment = setup.mdr.add_soc_comment(long_html(20))
    await setup.run()
    setup.mdr.comments.clear()

    await setup.run(times=2)

    bodies = [ticket_comment.body for ticket_comment in setup.tickets.comments(setup.ref.key)]
    assert len(bodies) >= 3
    assert all("Paragraph" not in body for body in bodies)
    changes = {row.source_id for row in await setup.rows(COMMENT_CHANGE) if row.state == DONE}
    assert changes == {f"{part_key(comment.comment_id, part)}:deleted" for part in range(1, len(bodies) + 1)}


async def test_memory_mdr_delete_one_note(setup: Setup) -> None:
    """A split comment deleted in MDR under `note` gets one note, and later runs add none."""
    setup.mdr.add_soc_comment(long_html(20))
    await setup.run(on_mdr_delete="note")
    parts = len(setup.tickets.comments(setup.ref.key))
    setup.mdr.comments.clear()

    await setup.run(times=3, on_mdr_delete="note")

    comments = setup.tickets.comments(setup.ref.key)
    notes = [comment for comment in comments if comment.marker is not None and comment.marker.origin == NOTICE_ORIGIN]
    assert len(notes) == 1
    assert len(comments) == parts + 1


# The engine with the MDR and Jira simulators


def copies_by_marker(issue: Any) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    for comment in issue.comments:
        marker = marker_of(comment)
        if marker.get("origin") == MDR_ORIGIN:
            found.setdefault(marker["source_id"], []).append(comment)
    return found


async def test_jira_split_whole_text(harness: SyncHarness) -> None:
    """70,000 characters become 3 Jira comments in order, each within the limit, that join to the unlimited text."""
    incident_id = harness.seed()["incident_id"]
    html = "".join(f"<p>{text}</p>" for text in paragraphs(720, words=12))
    comment_id = harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, html, author=SOC_ANALYST)["comment_id"]

    await run_cycles(harness)

    issue = harness.issue_for(incident_id)
    copies = copies_by_marker(issue)
    assert sorted(copies) == sorted(part_key(comment_id, part) for part in (1, 2, 3))
    assert all(len(found) == 1 for found in copies.values())
    ordered = sorted((copy for [copy] in copies.values()), key=lambda copy: copy.id)
    assert [marker_of(copy)["source_id"] for copy in ordered] == [part_key(comment_id, part) for part in (1, 2, 3)]
    for number, copy in enumerate(ordered, start=1):
        assert utf16_length(copy.body) <= MAX_TEXT_LENGTH
        assert SOC_ANALYST in copy.body.split("\n", 1)[0]
        assert f"Part {number} of 3" in copy.body
    unlimited = markup.markdown_to_jira(markup.html_to_markdown(html))
    assert 70_000 <= utf16_length(unlimited) < 2.5 * MAX_TEXT_LENGTH
    assert squeezed("".join(part_body(copy.body) for copy in ordered)) == squeezed(unlimited)
    assert harness.jira.sim.calls[JIRA_COMMENT_POST] == 3


async def test_jira_code_block_balanced(harness: SyncHarness) -> None:
    """A code block longer than a Jira comment is split into parts that each close every block they open."""
    incident_id = harness.seed()["incident_id"]
    lines = [f"2026-12-04 10:00:{number % 60:02d} process {number} started" for number in range(1500)]
    html = "<p>Log excerpt:</p><pre><code>" + "\n".join(lines) + "</code></pre><p>End of log.</p>"
    harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, html, author=SOC_ANALYST)

    await run_cycles(harness)

    copies = [copy for [copy] in copies_by_marker(harness.issue_for(incident_id)).values()]
    assert len(copies) >= 2
    for copy in copies:
        assert utf16_length(copy.body) <= MAX_TEXT_LENGTH
        assert _open_block(copy.body) is None, copy.body[-200:]
    stored = "\n".join(copy.body for copy in copies)
    assert all(line in stored for line in lines)


async def test_jira_lost_reply_no_duplicate(harness: SyncHarness) -> None:
    """Jira stores part 2 but its reply is lost: the next cycles find it by marker and post only part 3."""
    incident_id = harness.seed()["incident_id"]
    html = "".join(f"<p>{text}</p>" for text in paragraphs(720, words=12))
    comment_id = harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, html, author=SOC_ANALYST)["comment_id"]
    sim = harness.jira.sim

    def drop_part_two(engine: ConnectionSync) -> None:
        real_add = engine.tickets.add_comment

        async def add_dropping(ref: TicketRef, draft: CommentDraft) -> TicketComment:
            if draft.marker.source_id == part_key(comment_id, 2) and not sim.faults.fired["drop_after_commit"]:
                sim.faults.add("drop_after_commit", method="POST", path="/rest/api/2/issue/*/comment", count=1)
            return await real_add(ref, draft)

        engine.tickets.add_comment = add_dropping  # type: ignore[method-assign]

    await run_cycles(harness, drop_part_two)
    await run_cycles(harness)

    assert sim.faults.fired["drop_after_commit"] == 1
    copies = copies_by_marker(harness.issue_for(incident_id))
    assert sorted(copies) == sorted(part_key(comment_id, part) for part in (1, 2, 3))
    for source_id, found in copies.items():
        assert len(found) == 1, f"{source_id} has {len(found)} copies"
    assert sim.calls[JIRA_COMMENT_POST] == 3
    rows = await harness.store.get_items(harness.connection.name, incident_id, COMMENT)
    assert {row.source_id: row.state for row in rows if row.direction == MDR_TO_TICKET} == {
        part_key(comment_id, part): DONE for part in (1, 2, 3)
    }


async def test_jira_emoji_counted_utf16(harness: SyncHarness) -> None:
    """Emoji count as two UTF-16 code units, so text within 32,767 characters but over the limit in code units splits."""
    incident_id = harness.seed()["incident_id"]
    emoji_count = 20_000
    html = "<p>" + "😀" * emoji_count + "</p>"
    harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, html, author=SOC_ANALYST)

    await run_cycles(harness)

    copies = [copy for [copy] in copies_by_marker(harness.issue_for(incident_id)).values()]
    assert len(html) < MAX_TEXT_LENGTH
    assert len(copies) == 2
    for copy in copies:
        assert utf16_length(copy.body) <= MAX_TEXT_LENGTH
    assert sum(copy.body.count("😀") for copy in copies) == emoji_count
