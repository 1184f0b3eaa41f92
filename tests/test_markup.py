"""Conversions between MDR HTML, Markdown and Jira wiki markup, and their content-loss fallback."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from typing import Any

import pypandoc
import pytest

from mdr_connector.connector import markup


@pytest.fixture(autouse=True)
def fresh_cache() -> Iterator[None]:
    """Clear the conversion cache so each test runs pandoc itself."""
    markup._convert_cached.cache_clear()
    yield
    markup._convert_cached.cache_clear()


@pytest.mark.parametrize(
    ("markdown", "wiki"),
    [
        ("**bold** and *italic*", "*bold* and _italic_"),
        ("[docs](https://example.test/a_b)", "[docs|https://example.test/a_b]"),
        ("`inline`", "{{inline}}"),
        ("- one\n- two", "* one\n* two"),
        ("1. one\n2. two", "# one\n# two"),
        ("```python\nprint(1)\n```", "{code:python}\nprint(1)\n{code}"),
        ("# Заголовок", "h1. Заголовок"),
        ("Привет 😀 мир", "Привет 😀 мир"),
    ],
    ids=["emphasis", "link", "code-span", "bullets", "numbers", "code-block", "cyrillic-heading", "emoji"],
)
def test_markdown_to_jira(markdown: str, wiki: str) -> None:
    """Common Markdown becomes the matching Jira wiki markup."""
    assert markup.markdown_to_jira(markdown) == wiki


@pytest.mark.parametrize(
    "markdown",
    [
        "**bold** and *italic* with `code`",
        "Привет, мир! 😀 👍🏽",
        "See [the report](https://example.test/r?id=1)",
        "a < b & c > d",
        "+7 495 123-45-67 and ~/bin and a|b",
        "C:\\Windows\\System32\\cmd.exe",
        "| host | ip |\n|---|---|\n| ws-01 | 10.0.0.5 |",
    ],
    ids=["emphasis", "cyrillic-emoji", "link", "angle-brackets", "plus-tilde-pipe", "windows-path", "table"],
)
def test_markdown_round_trip(markdown: str) -> None:
    """Markdown through Jira wiki and back keeps every character of the text."""
    back = markup.jira_to_markdown(markup.markdown_to_jira(markdown))

    assert markup._missing_characters(markdown, back) == 0
    assert "```" not in back


def test_plus_escape_read_back() -> None:
    """`\\+7` written by the Jira writer reads back as `+7`, not a stray backslash."""
    wiki = markup.markdown_to_jira("+7 495")

    assert wiki == "\\+7 495"
    assert markup.jira_to_markdown(wiki) == "+7 495"


def test_headings_without_anchor() -> None:
    """Headings carry no `{anchor}` macro."""
    assert "anchor" not in markup.markdown_to_jira("## Timeline\n\ntext")


@pytest.mark.parametrize(
    ("html", "expected"),
    [
        ("<p>\nThe first comment.\n</p>", "The first comment."),
        ("<p>Hello <b>world</b> &amp; friends</p>", "Hello **world** & friends"),
        ("<ul><li>one</li><li>two</li></ul>", "- one\n- two"),
        ("<p>a &lt;b&gt; c</p>", "a \\<b\\> c"),
        ("<p>x<span style='color:red'>red</span></p>", "xred"),
        ("<p>Привет 😀</p><script>alert(1)</script>", "Привет 😀"),
        ("text\n\n<!-- ваш комментарий -->", "text"),
    ],
    ids=["paragraph", "bold-entity", "list", "escaped-tag", "span", "script", "comment"],
)
def test_html_to_markdown(html: str, expected: str) -> None:
    """MDR HTML becomes plain GitHub Markdown without raw HTML."""
    assert markup.html_to_markdown(html) == expected


def test_html_to_jira_and_back() -> None:
    """MDR HTML with Cyrillic, emoji and a literal tag reads the same after a trip through Jira."""
    html = "<p>Хост <b>ws-01</b> изолирован 😀. Ввод: &lt;b&gt;текст&lt;/b&gt; &amp; ещё</p>"

    markdown = markup.html_to_markdown(html)
    back = markup.jira_to_markdown(markup.markdown_to_jira(markdown))

    assert back == markdown
    assert "Хост **ws-01** изолирован 😀" in back
    assert "\\<b\\>текст\\</b\\>" in back


@pytest.mark.parametrize(
    "wiki",
    ["a {code}x{code} b", "text {noformat} unclosed more words", "before {code} after"],
    ids=["inline-code-macro", "unclosed-noformat", "unclosed-code"],
)
def test_jira_loss_falls_back(wiki: str, caplog: pytest.LogCaptureFixture) -> None:
    """Wiki text pandoc would drop comes back whole in a fenced block, with a log event."""
    with caplog.at_level(logging.WARNING, logger=markup.__name__):
        result = markup.jira_to_markdown(wiki)

    assert result == f"```\n{wiki}\n```"
    assert [record.message for record in caplog.records] == ["markup.content_lost"]


def test_fence_longer_than_backticks() -> None:
    """The fallback fence is longer than any backtick run in the text."""
    result = markup.jira_to_markdown("a {code}x{code} ```` b")

    assert result.startswith("`````\n")
    assert result.endswith("\n`````")


def test_markdown_loss_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    """Markdown the Jira writer would drop (a link reference definition) is sent as a `{noformat}` block."""
    with caplog.at_level(logging.WARNING, logger=markup.__name__):
        wiki = markup.markdown_to_jira("[link]: http://x\n\nsee [link] please review")

    assert wiki == "{noformat}\n[link]: http://x\n\nsee [link] please review\n{noformat}"
    assert caplog.records[0].message == "markup.content_lost"


def test_noformat_in_fallback() -> None:
    """A `{noformat}` inside fallback text cannot close the block early."""
    wiki = markup.markdown_to_jira("[link]: http://x\n\nsee [link] {noformat} words")

    assert wiki.count("{noformat}") == 2
    assert "{ noformat} words" in wiki


def test_pandoc_failure_falls_back(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """When pandoc cannot run, the plain rendering is returned and the failure logged."""

    def broken(text: str, reader: str, writer: str, deadline: float) -> str:
        raise OSError("pandoc missing")

    monkeypatch.setattr(markup, "_run_pandoc", broken)
    with caplog.at_level(logging.WARNING, logger=markup.__name__):
        result = markup.html_to_markdown("<p>Привет *мир* 1.5</p>")

    assert result == "Привет \\*мир\\* 1\\.5"
    assert caplog.records[0].message == "markup.pandoc.failed"


def test_empty_input() -> None:
    """Blank input converts to an empty string without running pandoc."""
    assert markup.markdown_to_jira("  \n") == ""
    assert markup.jira_to_markdown("") == ""
    assert markup.html_to_markdown("") == ""


def test_results_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same text converts once; later calls reuse the result."""
    calls: list[str] = []
    real = markup._run_pandoc

    def counting(text: str, reader: str, writer: str, deadline: float) -> str:
        calls.append(text)
        return real(text, reader, writer, deadline)

    monkeypatch.setattr(markup, "_run_pandoc", counting)
    markup.markdown_to_jira("**same**")
    first_conversion = len(calls)
    markup.markdown_to_jira("**same**")

    assert calls[0] == "**same**"
    assert len(calls) == first_conversion


# Hostile input: Markdown for the MDR console carries no raw HTML.


class _Tags(HTMLParser):
    """Every start tag of an HTML fragment with its attributes."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def rendered(markdown: str) -> str:
    """Render Markdown to HTML as a CommonMark console would, with raw HTML allowed."""
    return pypandoc.convert_text(markdown, "html", format="gfm")


def markdown_nodes(markdown: str) -> str:
    """Pandoc's document tree of the Markdown, as JSON text."""
    return pypandoc.convert_text(markdown, "json", format="gfm")


def assert_no_active_html(markdown: str) -> None:
    page = rendered(markdown)
    parser = _Tags()
    parser.feed(page)
    for banned in ("<script", "<img", "<iframe", "<svg", "<span", "<u>", "<sup>"):
        assert banned not in page
    for tag, attributes in parser.tags:
        assert tag not in ("script", "img", "iframe", "svg", "object", "embed", "style")
        assert not [name for name in attributes if name.startswith("on")]
        assert not (attributes.get("href") or "").lower().startswith(("javascript:", "data:", "vbscript:"))
    tree = markdown_nodes(markdown)
    for kind in ("RawInline", "RawBlock", "Image"):
        assert f'"t":"{kind}"' not in tree


HOSTILE_WIKI = {
    "image-onerror": "!https://evil.example/a.png|onerror=alert(document.cookie)!",
    "anchor-script": '{anchor:a"><script>alert(1)</script><b x="}',
    "script": "Before <script>alert(document.cookie)</script> after",
    "iframe": '<iframe src="https://evil.example/x" onload="alert(1)"></iframe>',
    "html-macro": "{html}<b>x</b>{html}",
    "img-tag": "look <img src=x onerror=alert(1)> here",
    "link-attributes": '<a href="javascript:alert(1)" onclick="alert(2)">x</a>',
    "svg": "<svg onload=alert(1)><circle/></svg>",
    "script-in-code": "{code}<script>alert(1)</script>{code}",
    "script-in-monospace": "{{<script>alert(1)</script>}}",
    "needs-html": "+under+ ^sup^ ~sub~ {color:red}red{color} !a.png|width=3!",
    "html-comment": "<!-- x --> <style>body{}</style> text",
}


@pytest.mark.parametrize("wiki", HOSTILE_WIKI.values(), ids=HOSTILE_WIKI.keys())
def test_jira_hostile_markdown(wiki: str) -> None:
    """Hostile Jira markup becomes Markdown that renders no script, image, frame or event handler."""
    markdown = markup.jira_to_markdown(wiki)

    assert_no_active_html(markdown)


def test_jira_image_becomes_link() -> None:
    """An image with an event-handler attribute becomes a plain link to it."""
    markdown = markup.jira_to_markdown("!https://evil.example/a.png|onerror=alert(document.cookie)!")
    page = rendered(markdown)

    assert markdown == "<https://evil.example/a.png>"
    assert "onerror" not in page
    assert 'href="https://evil.example/a.png"' in page


def test_jira_anchor_script_dropped() -> None:
    """An anchor whose name carries a script has no visible text, so nothing of it is left."""
    assert markup.jira_to_markdown('{anchor:a"><script>alert(1)</script><b x="}') == ""


def test_jira_tags_become_text() -> None:
    """Tags typed in Jira stay visible as escaped text, so no word is lost."""
    markdown = markup.jira_to_markdown("Before <script>alert(document.cookie)</script> {html}<b>x</b>{html}")

    assert markdown == "Before \\<script\\>alert(document.cookie)\\</script\\> {html}\\<b\\>x\\</b\\>{html}"
    assert "&lt;script&gt;alert(document.cookie)&lt;/script&gt;" in rendered(markdown)


HOSTILE_HTML = {
    "img-onerror": '<p>x<img src="https://evil.example/a.png" onerror="alert(1)">y</p>',
    "script": "<p>t</p><script>alert(1)</script>",
    "iframe": '<iframe src="https://evil.example/"></iframe><p>t</p>',
    "javascript-link": '<a href="javascript:alert(1)" onclick="alert(2)">click</a>',
    "data-image": '<p>a<img src="data:image/svg+xml;base64,PHN2Zz4=" alt="shot">b</p>',
    "attributes": '<p onclick="alert(1)" style="x">t <u>u</u><sup>2</sup><span class="c">s</span></p>',
    "svg": "<svg onload=alert(1)><text>s</text></svg>",
    "escaped-tag": "<p>&lt;img src=x onerror=alert(1)&gt;</p>",
}


@pytest.mark.parametrize("source", HOSTILE_HTML.values(), ids=HOSTILE_HTML.keys())
def test_html_hostile_markdown(source: str) -> None:
    """Hostile MDR HTML becomes Markdown that renders no script, image, frame or event handler."""
    assert_no_active_html(markup.html_to_markdown(source))


def test_html_script_link_as_text() -> None:
    """A link with a script scheme keeps its text and shows its target as text."""
    assert markup.html_to_markdown('<a href="javascript:alert(1)">click</a>') == "click (javascript:alert(1))"


def test_html_image_becomes_link() -> None:
    """An HTML image becomes a link, and the text right after the link still counts as kept."""
    markdown = markup.html_to_markdown('<p>x<img src="https://evil.example/a.png" onerror="alert(1)">y</p>')

    assert markdown == "x<https://evil.example/a.png>y"


def test_fallbacks_render_safely() -> None:
    """The plain renderings used on content loss show tags as text."""
    wiki = "a {code}x{code} <script>alert(1)</script> ```` b"

    markdown = markup.jira_to_markdown(wiki)

    assert markdown.startswith("`````")
    assert_no_active_html(markdown)
    assert_no_active_html(markup._html_fallback("<p>&lt;script&gt;alert(1)&lt;/script&gt;</p>"))


def test_unsafe_result_falls_back(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """When the result still reads as an image, the check after the writer sends the plain rendering."""
    monkeypatch.setattr(markup, "_defang", lambda node, raw_html: node)
    wiki = "!https://evil.example/a.png!"

    with caplog.at_level(logging.WARNING, logger=markup.__name__):
        markdown = markup.jira_to_markdown(wiki)

    assert markdown == f"```\n{wiki}\n```"
    assert [record.message for record in caplog.records] == ["markup.raw_html"]
    assert caplog.records[0].node_types == ["Image"]


# Size limits and timeouts


def no_pandoc(*args: Any) -> str:
    raise AssertionError("pandoc must not run")


@pytest.mark.parametrize(
    ("convert", "source", "start"),
    [
        (markup.jira_to_markdown, "*word* <script> " * 20000, "```\n*word*"),
        (markup.markdown_to_jira, "**word** " * 40000, "{noformat}\n**word**"),
        (markup.html_to_markdown, "<p>word &lt;b&gt;</p>" * 20000, "word \\<b\\>"),
    ],
    ids=["jira", "markdown", "html"],
)
def test_too_large_skips_pandoc(
    convert: Any, source: str, start: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An input over 256 KB gets the plain rendering without pandoc, logged with its size."""
    monkeypatch.setattr(markup, "_run_pandoc", no_pandoc)

    with caplog.at_level(logging.WARNING, logger=markup.__name__):
        result = convert(source)

    assert result.startswith(start)
    assert result.count("word") == source.count("word")
    assert [record.message for record in caplog.records] == ["markup.too_large"]
    assert caplog.records[0].size_bytes == len(source.encode("utf-8"))
    assert markup._convert_cached.cache_info().currsize == 0


def test_timeout_is_five_seconds() -> None:
    """A stuck pandoc delays a sync cycle by at most 5 seconds per conversion."""
    assert markup.PANDOC_TIMEOUT_SECONDS <= 5


def test_steps_share_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reader, writer and check of one conversion share one deadline."""
    deadlines: list[float] = []
    real = markup._run_pandoc

    def recording(text: str, reader: str, writer: str, deadline: float) -> str:
        deadlines.append(deadline)
        return real(text, reader, writer, deadline)

    monkeypatch.setattr(markup, "_run_pandoc", recording)
    before = time.monotonic()
    markup.jira_to_markdown("*bold* text")

    assert len(deadlines) == 3
    assert len(set(deadlines)) == 1
    assert deadlines[0] <= before + markup.PANDOC_TIMEOUT_SECONDS + 1


@pytest.mark.parametrize(
    ("convert", "source", "error_type"),
    [
        (markup.jira_to_markdown, "[" * 10000 + "]" * 10000, {"TimeoutExpired"}),
        (markup.jira_to_markdown, "{" * 16000, {"TimeoutExpired"}),
        # The reader is usually fast here, and the tree is too deep to read
        # back in Python. On a loaded machine the reader may time out first.
        (markup.html_to_markdown, "<b><i>" * 10000 + "end", {"RecursionError", "TimeoutExpired"}),
    ],
    ids=["brackets", "braces", "nested-tags"],
)
def test_pathological_input_times_out(
    convert: Any,
    source: str,
    error_type: set[str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Input that stalls pandoc gets the plain rendering, with no text lost."""
    monkeypatch.setattr(markup, "PANDOC_TIMEOUT_SECONDS", 0.5)

    with caplog.at_level(logging.WARNING, logger=markup.__name__):
        result = convert(source)

    assert caplog.records[0].message == "markup.pandoc.failed"
    assert caplog.records[0].error_type in error_type
    assert source.strip("<bi>") in result


def test_timeout_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pandoc timeout keeps every word of the source."""

    def stuck(text: str, reader: str, writer: str, deadline: float) -> str:
        raise subprocess.TimeoutExpired(["pandoc"], markup.PANDOC_TIMEOUT_SECONDS)

    monkeypatch.setattr(markup, "_run_pandoc", stuck)

    assert markup.jira_to_markdown("a *b* c") == "```\na *b* c\n```"
    assert markup.markdown_to_jira("a **b** c") == "{noformat}\na **b** c\n{noformat}"


def test_large_input_not_cached() -> None:
    """Inputs over 64 KB are converted each time instead of filling the cache."""
    large = "word " * 14000
    small = "word"

    markup.jira_to_markdown(large)
    assert markup._convert_cached.cache_info().currsize == 0
    markup.jira_to_markdown(small)
    assert markup._convert_cached.cache_info().currsize == 1


# Lone surrogates and control characters


@pytest.mark.parametrize(
    ("text", "clean"),
    [
        ("a\ud800b", "a\ufffdb"),
        ("a\udc00", "a\ufffd"),
        ("\ud83d\ude00", "😀"),
        ("\ude00\ud83d", "\ufffd\ufffd"),
        ("a\x00b\x01c\x07\x08\x0b\x0c\x1b\x1fd", "abcd"),
        ("tab\tline\ncr\r\x7f😀", "tab\tline\ncr\r\x7f😀"),
    ],
    ids=["lone-high", "lone-low", "pair", "reversed-pair", "controls", "kept"],
)
def test_clean_text(text: str, clean: str) -> None:
    """Lone surrogates become U+FFFD, and NUL and C0 controls other than tab, LF and CR are removed."""
    assert markup.clean_text(text) == clean


@pytest.mark.parametrize(
    "convert",
    [markup.jira_to_markdown, markup.markdown_to_jira, markup.html_to_markdown],
    ids=["jira", "markdown", "html"],
)
def test_conversions_clean_input(convert: Any) -> None:
    """A lone surrogate or a NUL in any input converts without an error."""
    result = convert("bad \ud800 text\x00 here")

    assert "\ufffd" in result
    assert "\x00" not in result
    result.encode("utf-8")


# Textile and CommonMark for Redmine, plain text for ServiceNow

def test_textile_reads_into_markdown() -> None:
    """Redmine Textile from a person becomes Markdown headings, strong text, links and lists, with Cyrillic and emoji intact."""
    markdown = markup.textile_to_markdown(
        'h2. Сводка\n\nHost *WS-01* isolated, see "the console":https://mdr.example/incidents/7 🙂\n\n* one\n* two'
    )

    assert "## Сводка" in markdown
    assert "**WS-01**" in markdown
    assert "[the console](https://mdr.example/incidents/7)" in markdown
    assert "- two" in markdown
    assert "🙂" in markdown


@pytest.mark.parametrize(
    "convert", [markup.textile_to_markdown, markup.commonmark_to_markdown], ids=["textile", "commonmark"]
)
def test_redmine_text_to_markdown_carries_no_raw_html(convert: Any) -> None:
    """HTML typed into a Redmine note reaches MDR as visible text, never as markup."""
    markdown = convert('before <img src=x onerror="alert(1)"> <script>alert(2)</script> after')

    assert re.search(r"(?<!\\)<", markdown) is None
    assert "\\<img" in markdown
    assert "\\<script\\>" in markdown
    assert "before" in markdown
    assert "after" in markdown


def test_plain_to_markdown_escapes_every_markup_character() -> None:
    """A ServiceNow journal entry shows as written in MDR: no emphasis, links or headings appear."""
    markdown = markup.plain_to_markdown("# not a heading\n*not bold* [not](a link)\n\nПривет")

    assert markdown.startswith("\\# not a heading")
    assert "\\*not bold\\*" in markdown
    assert "\\[not\\]\\(a link\\)" in markdown
    assert markdown.endswith("Привет")


# GitHub Markdown without `[` or `<`, so it has no link, image or raw HTML
# that the tree step could rewrite, but every other kind of block.
TEXTS_WITHOUT_TREE_TARGETS = [
    "Plain words.",
    "# Heading\n\nSome *emphasis*, **strong**, ~~struck~~ and `code`.",
    "- one\n- two\n  - nested\n\n1. first\n2. second",
    "```\ncode block {html} {noformat}\n```\n\n> quoted line",
    "| a | b |\n|---|---|\n| 1 | 2 |",
    "click javascript:alert(1) or vbscript:x or data:text/html,x",
    "mail soc@example.com and see www.example.com",
    "&lt;script&gt;alert(1)&lt;/script&gt; and &amp;",
    "{html}raw{html} {color:red}text{color} !image.png! |cell|",
    "emoji \U0001F600, right-to-left \u202egnp.exe, tab\tand backslash \\ end",
    "line one  \nline two\\\nline three\n\n---\n\nafter rule",
]


@pytest.mark.parametrize("route_name", ["markdown-jira", "commonmark-markdown"])
@pytest.mark.parametrize("text", TEXTS_WITHOUT_TREE_TARGETS)
def test_direct_conversion_equals_tree_path(route_name: str, text: str) -> None:
    route = markup.ROUTES[route_name]
    deadline = time.monotonic() + markup.PANDOC_TIMEOUT_SECONDS

    document = json.loads(markup._run_pandoc(text, route.reader, "json", deadline))
    document["blocks"] = markup._defang(document["blocks"], route.raw_html)
    through_tree = markup._run_pandoc(json.dumps(document), "json", route.writer, deadline)
    direct = markup._run_pandoc(text, route.reader, route.writer, deadline)

    assert markup._has_no_tree_targets(text, route)
    assert direct == through_tree


def test_tree_path_kept_for_links() -> None:
    route = markup.ROUTES["markdown-jira"]

    assert not markup._has_no_tree_targets("[x](javascript:alert(1))", route)
    assert not markup._has_no_tree_targets("<b>bold</b>", route)
    assert not markup._has_no_tree_targets("get ftp://example.com/payload.exe", route)
    assert not markup._has_no_tree_targets("see https://example.com", route)
    assert not markup._has_no_tree_targets("plain", markup.ROUTES["textile-markdown"])


def test_bare_ftp_url_not_linked_in_jira() -> None:
    wiki = markup.markdown_to_jira("get ftp://example.com/payload.exe now")

    assert "[ftp://" not in wiki
    assert "ftp://example.com/payload.exe" in wiki

