"""Convert bodies between MDR HTML, Markdown (GitHub flavour) and Jira wiki markup.

The engine keeps every body as Markdown; adapters convert at their edge.
Pandoc does the work. Pandoc 3.9 loses text silently on some input: its
Jira reader turns `a {code}x{code} b` into `a`, and its Markdown reader
takes a line starting with `<script>` as a raw HTML block that the Jira
writer then drops. So each conversion compares the letters, digits and
emoji of source and result, ignoring markup and URLs, and when any are
missing it returns a plain rendering of the source instead, so no text is
lost.

The functions are synchronous and start one pandoc process per new text
(results are cached). From async code, run them with `asyncio.to_thread`.
"""

from __future__ import annotations

import html
import logging
import re
import subprocess
import unicodedata
from collections import Counter
from collections.abc import Callable
from functools import lru_cache
from html.parser import HTMLParser

import pypandoc

log = logging.getLogger(__name__)

PANDOC_TIMEOUT_SECONDS = 30.0
CACHE_SIZE = 2048

# Letters and digits in URLs, markup keywords and tags are not text, so
# they are removed before source and result are compared.
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://\S+|\bmailto:\S+")
_WIKI_MACRO = re.compile(r"(?<!\{)\{[A-Za-z]+(?::[^{}\n]*)?\}(?!\})")
_WIKI_BLOCK_PREFIX = re.compile(r"^[ \t]*(?:h[1-6]|bq)\.", re.MULTILINE)
_WIKI_EMOTICON = re.compile(r"\((?:y|n|i|/|x|!|\+|-|\?|on|off|\*[rgby]?|flag|flagoff)\)")
_WIKI_IMAGE_ATTRIBUTES = re.compile(r"(![^!\s|]+)\|[^!\n]*!")
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_HTML_TAG = re.compile(r"(?<!\\)</?[A-Za-z][^<>\n]*>")
_GENERATED_TAG = re.compile(
    r"(?<!\\)</?(?:a|br|cite|del|div|img|ins|s|span|sub|sup|u)\b([^<>\n]*)>"
)
_TAG_SOURCE = re.compile(r"\bsrc=\"([^\"]*)\"")
_MD_TASK_BOX = re.compile(r"^([ \t>]*[-*+][ \t]+)\[[ xX]\]", re.MULTILINE)
_MD_ORDERED_MARKER = re.compile(r"^([ \t>]*)\d{1,9}[.)](?=[ \t]|$)", re.MULTILINE)
_MD_FENCE_INFO = re.compile(r"^([ \t]*(?:`{3,}|~{3,}))[^`\n]*$", re.MULTILINE)
_HEADING_ANCHOR = re.compile(r"^(h[1-6]\. )\{anchor(?::[^{}\n]*)?\}", re.MULTILINE)

# Pandoc's Jira reader keeps the backslash of these escapes and reads the
# character as markup (`\+7` becomes a stray backslash and an underline).
_WIKI_ESCAPE = re.compile(r"\\\\|\\([+^~|])")
_WIKI_VERBATIM = re.compile(
    r"(\{code(?::[^{}\n]*)?\}.*?\{code\}|\{noformat(?::[^{}\n]*)?\}.*?\{noformat\})",
    re.DOTALL,
)

# Task-list boxes the Jira writer adds and the Jira reader turns back into `[ ]`.
_IGNORED_SYMBOLS = frozenset("☐☒")
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~&])")


def html_to_markdown(source: str) -> str:
    """Convert MDR HTML to Markdown; fall back to the escaped text of the HTML."""
    return _convert(source, "html")


def markdown_to_jira(source: str) -> str:
    """Convert Markdown to Jira wiki markup; fall back to a `{noformat}` block."""
    # NOTE: pandoc writes a backslash as `&bsol;`, because `\\` is a line
    # break in Jira; whether Jira renders that entity is not verified.
    return _convert(source, "markdown-jira")


def jira_to_markdown(source: str) -> str:
    """Convert Jira wiki markup to Markdown; fall back to a fenced code block."""
    return _convert(source, "jira-markdown")


@lru_cache(maxsize=CACHE_SIZE)
def _convert(source: str, route_name: str) -> str:
    if not source.strip():
        return ""

    route = ROUTES[route_name]
    try:
        result = route.finish(_run_pandoc(route.prepare(source), route.reader, route.writer))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        log.warning(
            "markup.pandoc.failed",
            extra={"route": route_name, "error_type": type(err).__name__, "length": len(source)},
        )
        return route.fallback(source)

    missing = _missing_characters(route.text_of_source(source), route.text_of_result(result))
    if missing:
        log.warning(
            "markup.content_lost",
            extra={"route": route_name, "missing_characters": missing, "length": len(source)},
        )
        return route.fallback(source)
    return result


def _run_pandoc(text: str, reader: str, writer: str) -> str:
    command = [_pandoc_path(), "--from", reader, "--to", writer, "--wrap=none", "--sandbox"]
    completed = subprocess.run(
        command,
        input=text.encode("utf-8"),
        capture_output=True,
        timeout=PANDOC_TIMEOUT_SECONDS,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"pandoc exited with status {completed.returncode}")
    return completed.stdout.decode("utf-8").rstrip("\n")


@lru_cache(maxsize=1)
def _pandoc_path() -> str:
    # pypandoc-binary ships the pandoc executable; calling it directly
    # (rather than pypandoc.convert_text) gives a timeout, so a stuck
    # conversion cannot hold a worker thread forever.
    return pypandoc.get_pandoc_path()


def _missing_characters(source_text: str, result_text: str) -> int:
    """Count letters, digits and symbols of the source that the result lacks."""
    missing = _characters(source_text) - _characters(result_text)
    return sum(missing.values())


def _characters(text: str) -> Counter[str]:
    text = unicodedata.normalize("NFC", html.unescape(text)).casefold()
    text = _URL.sub(" ", text)
    return Counter(
        char
        for char in text
        if char.isalnum() or (unicodedata.category(char) == "So" and char not in _IGNORED_SYMBOLS)
    )


def _wiki_text(wiki: str) -> str:
    wiki = _WIKI_MACRO.sub(" ", wiki)
    wiki = _WIKI_BLOCK_PREFIX.sub(" ", wiki)
    wiki = _WIKI_EMOTICON.sub(" ", wiki)
    return _WIKI_IMAGE_ATTRIBUTES.sub(r"\1!", wiki)


def _markdown_source_text(markdown: str) -> str:
    # The Jira writer drops raw HTML and renumbers lists, so tags, comments,
    # list numbers and task boxes are not text that a conversion must keep.
    markdown = _HTML_COMMENT.sub(" ", markdown)
    markdown = _HTML_TAG.sub(" ", markdown)
    markdown = _MD_FENCE_INFO.sub(r"\1", markdown)
    markdown = _MD_TASK_BOX.sub(r"\1", markdown)
    return _MD_ORDERED_MARKER.sub(r"\1", markdown)


def _markdown_result_text(markdown: str) -> str:
    # Only the tags pandoc writes for Jira markup without a Markdown form are
    # removed; a tag typed as text comes out escaped or inside code.
    markdown = _GENERATED_TAG.sub(_tag_source, markdown)
    return _MD_FENCE_INFO.sub(r"\1", markdown)


def _tag_source(match: re.Match[str]) -> str:
    source = _TAG_SOURCE.search(match.group(1))
    return f" {source.group(1)} " if source else " "


class _VisibleText(HTMLParser):
    """The text a browser shows for an HTML fragment, without scripts and styles."""

    HIDDEN = frozenset({"script", "style", "template", "head", "title"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.HIDDEN:
            self.hidden_depth += 1
        elif tag in ("br", "p", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre"):
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.HIDDEN and self.hidden_depth:
            self.hidden_depth -= 1
        elif tag in ("td", "th"):
            self.parts.append(" ")

    def handle_data(self, data: str) -> None:
        if not self.hidden_depth:
            self.parts.append(data)


def _html_text(source: str) -> str:
    parser = _VisibleText()
    parser.feed(source)
    parser.close()
    return "".join(parser.parts)


def _decode_wiki_escapes(wiki: str) -> str:
    """Rewrite `\\+`, `\\^`, `\\~` and `\\|` outside code blocks as character references."""
    parts = _WIKI_VERBATIM.split(wiki)
    for index in range(0, len(parts), 2):
        parts[index] = _WIKI_ESCAPE.sub(_escape_to_reference, parts[index])
    return "".join(parts)


def _escape_to_reference(match: re.Match[str]) -> str:
    char = match.group(1)
    if char is None:
        return match.group(0)
    return f"&#{ord(char)};"


def _drop_heading_anchors(wiki: str) -> str:
    return _HEADING_ANCHOR.sub(r"\1", wiki)


def _markdown_escaped(text: str) -> str:
    """Render plain text as Markdown that shows every character as written."""
    lines = [_MD_SPECIAL.sub(r"\\\1", line.strip()) for line in text.splitlines()]
    paragraphs: list[list[str]] = [[]]
    for line in lines:
        if line:
            paragraphs[-1].append(line)
        elif paragraphs[-1]:
            paragraphs.append([])
    return "\n\n".join("\\\n".join(paragraph) for paragraph in paragraphs if paragraph)


def _html_fallback(source: str) -> str:
    return _markdown_escaped(_html_text(source))


def _jira_fallback(markdown: str) -> str:
    # A `{noformat}` inside the text would end the block early, so a space
    # goes after its brace: every word stays, but the macro name breaks.
    body = markdown.replace("{noformat}", "{ noformat}")
    return "{noformat}\n" + body + "\n{noformat}"


def _markdown_fallback(wiki: str) -> str:
    longest_run = max((len(run) for run in re.findall(r"`+", wiki)), default=0)
    fence = "`" * max(3, longest_run + 1)
    return f"{fence}\n{wiki}\n{fence}"


class _Route:
    """One conversion: pandoc formats, pre- and post-processing, checks and fallback."""

    def __init__(
        self,
        reader: str,
        writer: str,
        text_of_source: Callable[[str], str],
        text_of_result: Callable[[str], str],
        fallback: Callable[[str], str],
        prepare: Callable[[str], str] = lambda text: text,
        finish: Callable[[str], str] = lambda text: text,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.text_of_source = text_of_source
        self.text_of_result = text_of_result
        self.fallback = fallback
        self.prepare = prepare
        self.finish = finish


ROUTES = {
    "html": _Route(
        reader="html-native_divs-native_spans",
        writer="gfm-raw_html",
        text_of_source=_html_text,
        text_of_result=_markdown_result_text,
        fallback=_html_fallback,
    ),
    "markdown-jira": _Route(
        reader="gfm",
        writer="jira",
        text_of_source=_markdown_source_text,
        text_of_result=_wiki_text,
        fallback=_jira_fallback,
        finish=_drop_heading_anchors,
    ),
    "jira-markdown": _Route(
        reader="jira",
        writer="gfm",
        text_of_source=_wiki_text,
        text_of_result=_markdown_result_text,
        fallback=_markdown_fallback,
        prepare=_decode_wiki_escapes,
    ),
}
