"""Convert bodies between MDR HTML, Markdown (GitHub flavour), Jira wiki markup, Textile and plain text.

The engine keeps every body as Markdown; adapters convert at their edge.
Pandoc does the work. Pandoc 3.9 loses text silently on some input: its
Jira reader turns `a {code}x{code} b` into `a`, and its Markdown reader
takes a line starting with `<script>` as a raw HTML block that the Jira
writer then drops. So each conversion compares the letters, digits and
emoji of source and result, ignoring markup and URLs, and when any are
missing it returns a plain rendering of the source instead, so no text is
lost.

The MDR console renders the Markdown made here as HTML, so it must carry
no raw HTML, no images and no links with a script scheme. Pandoc reads the
source into its document tree, where images become links. Raw HTML read
from Jira markup becomes escaped text. Raw HTML read from MDR HTML is
dropped, because a browser shows no tag, script or comment as text. The
writer then emits GitHub Markdown without raw HTML. Pandoc's own Markdown reader reads the result
back, and if it still finds HTML or an image, the source gets the plain
rendering.
NOTE: this assumes the console follows CommonMark, where `\\<` is an
escaped character; a renderer with other escaping rules was not checked.

Markdown sent to Jira passes the same tree step, because it contains values
from MDR as they are: images become links, script links and raw HTML
become text, and the wiki writer escapes wiki markup typed in the text.

Every input first goes through `clean_text`. Inputs over
MAX_PANDOC_INPUT_BYTES skip pandoc and get the plain rendering. A
conversion gets PANDOC_TIMEOUT_SECONDS for all its pandoc runs together,
and gets the plain rendering when that time runs out.

The functions are synchronous. Each pandoc step goes to a long-lived
pandoc process of `connector/pandoc_pool.py`, or to a new pandoc process
when no such worker can start (results of small inputs are cached). From
async code, run them with `asyncio.to_thread`.
"""

from __future__ import annotations

import html
import json
import logging
import re
import subprocess
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator
from functools import lru_cache
from html.parser import HTMLParser
from typing import Any, Literal

import pypandoc

from mdr_connector.connector import pandoc_pool

log = logging.getLogger(__name__)

# Pathological inputs (`{` repeated 16,000 times in Jira markup, nested
# `<b><i>` in HTML) keep pandoc busy far longer than any real comment.
PANDOC_TIMEOUT_SECONDS = 5.0
MAX_PANDOC_INPUT_BYTES = 256 * 1024
# The pandoc command expands tabs to this stop before a text reader reads,
# and its Lua `pandoc.read`, which the worker pool uses, does not.
PANDOC_TAB_STOP = 4
BYTE_ORDER_MARK = "\ufeff"
# NOTE: the cache can still hold CACHE_SIZE inputs of this size with their
# results, an estimated 400 MB at worst.
MAX_CACHED_INPUT_BYTES = 64 * 1024
CACHE_SIZE = 2048
# Links with these schemes stay links. A link with any other scheme
# (javascript:, data:, vbscript:) is shown as text.
SAFE_URL_SCHEMES = frozenset({"http", "https", "mailto"})

RawHtmlPolicy = Literal["text", "drop"]

_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
# Browsers drop these from a URL before they read its scheme.
_URL_IGNORED = re.compile(r"[\x00-\x20\x7f]+")
_URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_RAW_KINDS = frozenset({"RawInline", "RawBlock"})
_NO_ATTRIBUTES: list[Any] = ["", [], []]
_DROP = object()

# Letters and digits in URLs, markup keywords and tags are not text, so
# they are removed before source and result are compared.
# A URL ends at a bracket, so text right after an autolink `<…>` or a
# Markdown link target still counts.
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s<>()\[\]]+|\bmailto:[^\s<>()\[\]]+")
_WIKI_MACRO = re.compile(r"(?<![{\\])\{[A-Za-z]+(?::[^{}\n]*)?\}(?!\})")
_TEXTILE_BLOCK_PREFIX = re.compile(r"^[ \t]*(?:h[1-6]|bq|bc|p|pre|fn\d+)(?:\([^)\n]*\)|\{[^}\n]*\}|[<>=]+)*\.\.? ", re.MULTILINE)
_WIKI_BLOCK_PREFIX = re.compile(r"^[ \t]*(?:h[1-6]|bq)\.", re.MULTILINE)
_WIKI_EMOTICON = re.compile(r"\((?:y|n|i|/|x|!|\+|-|\?|on|off|\*[rgby]?|flag|flagoff)\)")
_WIKI_IMAGE_ATTRIBUTES = re.compile(r"(![^!\s|]+)\|[^!\n]*!")
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_HTML_TAG = re.compile(r"(?<!\\)</?[A-Za-z][^<>\n]*>")
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


class UnsafeMarkdownError(ValueError):
    """A result in which pandoc's Markdown reader finds raw HTML, an image or a script link."""

    def __init__(self, kinds: list[str]) -> None:
        super().__init__(f"Markdown result has {', '.join(kinds)}")
        self.kinds = kinds


def clean_text(text: str) -> str:
    """Make text safe to encode and send.

    A lone UTF-16 surrogate becomes U+FFFD (a surrogate pair becomes its
    character), and NUL and the other C0 control characters except tab,
    line feed and carriage return are removed.
    """
    if _LONE_SURROGATE.search(text):
        text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return _CONTROL.sub("", text)


def html_to_markdown(source: str) -> str:
    """Convert MDR HTML to Markdown without raw HTML, or else to the escaped text of the HTML."""
    return _convert(clean_text(source), "html")


def markdown_to_jira(source: str) -> str:
    """Convert Markdown to Jira wiki markup; fall back to a `{noformat}` block."""
    # NOTE: pandoc writes a backslash as `&bsol;`, because `\\` is a line
    # break in Jira; whether Jira renders that entity is not verified.
    return _convert(clean_text(source), "markdown-jira")


def jira_to_markdown(source: str) -> str:
    """Convert Jira wiki markup to Markdown without raw HTML, or else to a fenced code block."""
    return _convert(clean_text(source), "jira-markdown")


def plain_to_markdown(source: str) -> str:
    """Render plain text, such as a ServiceNow journal entry, as Markdown that shows every character as written."""
    return _markdown_escaped(clean_text(source))


def textile_to_markdown(source: str) -> str:
    """Convert Redmine Textile to Markdown without raw HTML, or else to a fenced code block."""
    return _convert(clean_text(source), "textile-markdown")


def commonmark_to_markdown(source: str) -> str:
    """Read Markdown written by people (Redmine's CommonMark) into Markdown without raw HTML."""
    return _convert(clean_text(source), "commonmark-markdown")


def _convert(source: str, route_name: str) -> str:
    # Only small inputs are cached, so the cache cannot grow to gigabytes.
    if _utf8_size(source) <= MAX_CACHED_INPUT_BYTES:
        return _convert_cached(source, route_name)
    return _convert_once(source, route_name)


@lru_cache(maxsize=CACHE_SIZE)
def _convert_cached(source: str, route_name: str) -> str:
    return _convert_once(source, route_name)


def _convert_once(source: str, route_name: str) -> str:
    if not source.strip():
        return ""

    route = ROUTES[route_name]
    size = _utf8_size(source)
    if size > MAX_PANDOC_INPUT_BYTES:
        log.warning("markup.too_large", extra={"route": route_name, "size_bytes": size})
        return route.fallback(source)

    try:
        result = route.finish(_pandoc_convert(route.prepare(source), route))
    except UnsafeMarkdownError as err:
        log.warning(
            "markup.raw_html",
            extra={"route": route_name, "node_types": err.kinds, "length": len(source)},
        )
        return route.fallback(source)
    except (OSError, RuntimeError, ValueError, KeyError, subprocess.SubprocessError) as err:
        # RuntimeError covers RecursionError on a very deeply nested document.
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


def _utf8_size(text: str) -> int:
    return len(text.encode("utf-8"))


def _pandoc_convert(text: str, route: _Route) -> str:
    """Run the route's pandoc steps within one shared deadline."""
    deadline = time.monotonic() + PANDOC_TIMEOUT_SECONDS
    if route.raw_html is None or _has_no_tree_targets(text, route):
        converted = _run_pandoc(text, route.reader, route.writer, deadline)
    else:
        document = json.loads(_run_pandoc(text, route.reader, "json", deadline))
        document["blocks"] = _defang(document["blocks"], route.raw_html)
        converted = _run_pandoc(json.dumps(document), "json", route.writer, deadline)
    if route.raw_html is not None and route.writer.startswith("gfm"):
        _check_markdown(converted, deadline)
    return converted


def _has_no_tree_targets(text: str, route: _Route) -> bool:
    """Tell whether GitHub Markdown `text` cannot hold what the tree step rewrites, so pandoc may convert it directly.

    In that reader every image and link needs `[` or `<`, and raw HTML
    needs `<`. A bare URL becomes a link too: one with a scheme and `:/`
    (pandoc 3.9 links `ftp://` this way), or `www.` or an email address,
    which become http and mailto links. Other readers mark links and
    images in other ways.
    """
    if route.reader != "gfm":
        return False
    return not any(marker in text for marker in ("[", "<", ":/"))



def run_pandoc(text: str, reader: str, writer: str) -> str:
    """Run one pandoc conversion within PANDOC_TIMEOUT_SECONDS, for adapters that post-process pandoc's document tree.

    Raises OSError, RuntimeError or subprocess.SubprocessError when pandoc cannot run, fails or times out.
    """
    return _run_pandoc(text, reader, writer, time.monotonic() + PANDOC_TIMEOUT_SECONDS)


def _run_pandoc(text: str, reader: str, writer: str, deadline: float) -> str:
    pool = pandoc_pool.shared_pool(_pandoc_path())
    if not pool.unavailable:
        source = text if reader == "json" else _as_command_reads(text)
        try:
            return pool.convert(source.encode("utf-8"), reader, writer, deadline).rstrip("\n")
        except pandoc_pool.PandocUnavailableError:
            pass
    return _run_pandoc_process(text, reader, writer, deadline)


def _run_pandoc_process(text: str, reader: str, writer: str, deadline: float) -> str:
    command = [_pandoc_path(), "--from", reader, "--to", writer, "--wrap=none", "--sandbox"]
    timeout = deadline - time.monotonic()
    if timeout <= 0:
        raise subprocess.TimeoutExpired(command, PANDOC_TIMEOUT_SECONDS)
    completed = subprocess.run(
        command,
        input=text.encode("utf-8"),
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"pandoc exited with status {completed.returncode}")
    return completed.stdout.decode("utf-8").rstrip("\n")


def _as_command_reads(text: str) -> str:
    """Return `text` prepared so that the Lua `pandoc.read` of a worker reads what the pandoc command's reader reads.

    Pandoc 3.9's command drops one byte order mark at the start, removes
    every carriage return, expands tabs to PANDOC_TAB_STOP per line, ends
    each line with a line break and then adds one more line break.
    `pandoc.read` does none of this but drops a byte order mark at the
    start, so one is put there to be dropped in place of the first
    character. The breaks matter. Without the last one, pandoc's GitHub
    reader takes the last row of a pipe table at the end of the input for
    a paragraph. A code block or raw HTML block left open at the end would
    also lose its final line break. These rules come from comparing the
    outputs of both paths on random inputs, not from pandoc's source.
    """
    lines = text.removeprefix(BYTE_ORDER_MARK).replace("\r", "").split("\n")
    if lines[-1] == "":
        lines.pop()
    return BYTE_ORDER_MARK + "".join(_expand_tabs(line) + "\n" for line in lines) + "\n"


def _expand_tabs(line: str) -> str:
    if "\t" not in line:
        return line
    pieces = line.split("\t")
    expanded = [pieces[0]]
    column = len(pieces[0])
    for piece in pieces[1:]:
        padding = PANDOC_TAB_STOP - column % PANDOC_TAB_STOP
        expanded += [" " * padding, piece]
        column += padding + len(piece)
    return "".join(expanded)


@lru_cache(maxsize=1)
def _pandoc_path() -> str:
    # pypandoc-binary ships the pandoc executable; calling it directly
    # (rather than pypandoc.convert_text) gives a timeout, so a stuck
    # conversion cannot hold a worker thread forever.
    return pypandoc.get_pandoc_path()


# Pandoc's JSON document tree, in which each element is {"t": kind, "c": content}.


def _defang(node: Any, raw_html: RawHtmlPolicy) -> Any:
    """Rewrite every image, raw HTML element and script link in a pandoc tree."""
    if isinstance(node, list):
        items = (_defang(item, raw_html) for item in node)
        return [item for item in items if item is not _DROP]
    if not isinstance(node, dict) or "t" not in node:
        return node
    if "c" in node:
        node = {**node, "c": _defang(node["c"], raw_html)}
    return _defanged_element(node, raw_html)


def _defanged_element(node: dict[str, Any], raw_html: RawHtmlPolicy) -> Any:
    kind = node["t"]
    if kind in _RAW_KINDS:
        return _raw_as_text(node) if raw_html == "text" else _DROP
    if kind == "Image":
        return _image_as_link(node)
    if kind == "Link" and not _safe_url(node["c"][2][0]):
        _attributes, content, (url, _title) = node["c"]
        return {"t": "Span", "c": [_NO_ATTRIBUTES, [*content, {"t": "Space"}, _text(f"({url})")]]}
    return node


def _image_as_link(node: dict[str, Any]) -> Any:
    """Replace an image with a link to it, or with its alt text when its URL has an unsafe scheme."""
    _attributes, alt, target = node["c"]
    if not _safe_url(target[0]):
        return {"t": "Span", "c": [_NO_ATTRIBUTES, alt]} if alt else _DROP
    return {"t": "Link", "c": [_NO_ATTRIBUTES, alt or [_text(target[0])], target]}


def _raw_as_text(node: dict[str, Any]) -> dict[str, Any]:
    """Turn raw markup into text the writer escapes: a `Str` inline, or a paragraph of lines."""
    _format, raw = node["c"]
    if node["t"] == "RawInline":
        return _text(raw)
    lines: list[dict[str, Any]] = []
    for line in raw.splitlines():
        if lines:
            lines.append({"t": "LineBreak"})
        lines.append(_text(line))
    return {"t": "Para", "c": lines}


def _text(value: str) -> dict[str, Any]:
    return {"t": "Str", "c": value}


def _safe_url(url: str) -> bool:
    scheme = _URL_SCHEME.match(_URL_IGNORED.sub("", url))
    return scheme is None or scheme.group(1).lower() in SAFE_URL_SCHEMES


def _check_markdown(markdown: str, deadline: float) -> None:
    """Raise UnsafeMarkdownError when pandoc's GitHub Markdown reader finds HTML or images in the result."""
    if not markdown.strip():
        return
    document = json.loads(_run_pandoc(markdown, "gfm", "json", deadline))
    kinds = sorted(set(_unsafe_kinds(document["blocks"])))
    if kinds:
        raise UnsafeMarkdownError(kinds)


def _unsafe_kinds(node: Any) -> Iterator[str]:
    if isinstance(node, list):
        for item in node:
            yield from _unsafe_kinds(item)
        return
    if not isinstance(node, dict) or "t" not in node:
        return
    kind = node["t"]
    if kind in _RAW_KINDS or kind == "Image":
        yield kind
    elif kind == "Link" and not _safe_url(node["c"][2][0]):
        yield "Link"
    yield from _unsafe_kinds(node.get("c"))


# Content-loss check


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
    # Results carry no tags: a tag typed as text comes out escaped or inside code.
    return _MD_FENCE_INFO.sub(r"\1", markdown)


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


def _textile_text(textile: str) -> str:
    """Return the words of Textile, without block signatures, tags and URLs."""
    without_blocks = _TEXTILE_BLOCK_PREFIX.sub("", textile)
    return _HTML_TAG.sub(" ", _URL.sub(" ", without_blocks))


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
        raw_html: RawHtmlPolicy | None = None,
    ) -> None:
        # Routes that write Markdown for the MDR console or wiki markup for
        # Jira set `raw_html`, and their document tree is made safe between
        # reader and writer: no image, raw HTML element or script link.
        self.raw_html = raw_html
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
        # Tags a browser does not show as text (a script, a comment) carry no visible text.
        raw_html="drop",
    ),
    "markdown-jira": _Route(
        reader="gfm",
        writer="jira",
        text_of_source=_markdown_source_text,
        text_of_result=_wiki_text,
        fallback=_jira_fallback,
        finish=_drop_heading_anchors,
        # Values from MDR fill the mapping's Markdown templates as they are,
        # so a `[x](javascript:...)` link or a remote image in an incident
        # field would otherwise become live wiki markup.
        raw_html="text",
    ),
    "textile-markdown": _Route(
        reader="textile",
        writer="gfm-raw_html",
        text_of_source=_textile_text,
        text_of_result=_markdown_result_text,
        fallback=_markdown_fallback,
        raw_html="text",
    ),
    "commonmark-markdown": _Route(
        reader="gfm",
        writer="gfm-raw_html",
        text_of_source=_markdown_source_text,
        text_of_result=_markdown_result_text,
        fallback=_markdown_fallback,
        raw_html="text",
    ),
    "jira-markdown": _Route(
        reader="jira",
        writer="gfm-raw_html",
        text_of_source=_wiki_text,
        text_of_result=_markdown_result_text,
        fallback=_markdown_fallback,
        prepare=_decode_wiki_escapes,
        raw_html="text",
    ),
}
