"""Conversions between MDR HTML, Markdown and Jira wiki markup, and their content-loss fallback."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from mdr_connector.connector import markup


@pytest.fixture(autouse=True)
def fresh_cache() -> Iterator[None]:
    """Clear the conversion cache so each test runs pandoc itself."""
    markup._convert.cache_clear()
    yield
    markup._convert.cache_clear()


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
    """Markdown the Jira writer would drop is sent as a `{noformat}` block."""
    with caplog.at_level(logging.WARNING, logger=markup.__name__):
        wiki = markup.markdown_to_jira("<script>alert(1)</script> please review")

    assert wiki == "{noformat}\n<script>alert(1)</script> please review\n{noformat}"
    assert caplog.records[0].message == "markup.content_lost"


def test_noformat_in_fallback() -> None:
    """A `{noformat}` inside fallback text cannot close the block early."""
    wiki = markup.markdown_to_jira("<script>x</script> {noformat} words")

    assert wiki.count("{noformat}") == 2
    assert "{ noformat} words" in wiki


def test_pandoc_failure_falls_back(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """When pandoc cannot run, the plain rendering is returned and the failure logged."""

    def broken(text: str, reader: str, writer: str) -> str:
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

    def counting(text: str, reader: str, writer: str) -> str:
        calls.append(text)
        return real(text, reader, writer)

    monkeypatch.setattr(markup, "_run_pandoc", counting)
    markup.markdown_to_jira("**same**")
    markup.markdown_to_jira("**same**")

    assert calls == ["**same**"]
