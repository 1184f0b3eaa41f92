"""Write Markdown as Redmine 5.0 Textile or CommonMark that Redmine shows as written, with nothing active in it.

Redmine 5.0 renders Textile with its own fork of RedCloth 3
(lib/redmine/wiki_formatting/textile/redcloth3.rb), not the RedCloth 4
that pandoc's Textile writer targets. That fork has no `bc.` code blocks
and shows every HTML tag except pre, code, kbd and notextile as text, so
pandoc's code blocks, `<tt>` spans and HTML lists arrive as visible markup.
Redmine also reads its own syntax in the text of every note: macros
`{{include(Page)}}` run, `!http://host/x.png!` loads an image from any
host, `@login` notifies that user, and `#12`, `r12` or `commit:abc` link
to Redmine objects. MDR text may quote whatever an attacker typed, so the
connector reads the Markdown into pandoc's document tree and writes the
Textile itself:

- ASCII punctuation that Textile or Redmine reads as markup becomes a
  numeric character reference, which Redmine shows as the character;
- code spans are `@...@` with escaped text, and code blocks are `<pre>`
  blocks, whose text Redmine shows as is;
- images become links to the image, and links with other schemes than
  http, https and mailto become text;
- lists, quotes (`>` lines), tables and headings use the syntax the fork
  reads.

For CommonMark the Markdown is rewritten by pandoc with images as links,
raw HTML as text, and `{` and `@` as character references, so no macro or
mention remains in the stored text.
NOTE: in CommonMark, Redmine links such as `#12` stay active, and a code
span that starts with `@login` still notifies that user, because Redmine's
CommonMark rendering was not available to test against.

The functions are synchronous and start pandoc; call them through
`asyncio.to_thread`.
"""

from __future__ import annotations

import html
import itertools
import json
import logging
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from mdr_connector.connector import markup

log = logging.getLogger(__name__)

# Pandoc's reader: GitHub Markdown with HTML read as text, because the engine's bodies carry no HTML.
MARKDOWN_READER = "gfm-raw_html"
# Redmine's RedCloth3 counts these tags inside a <pre> block, so one in the code would end the block early.
_OFFTAG = re.compile(r"<(/?)(pre|code|kbd|notextile)", re.IGNORECASE)
ZERO_WIDTH_SPACE = "\u200b"

# Characters written as character references wherever they are text.
_TEXT_REFERENCES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}
_TEXT_NUMBERED = frozenset("!#%*+-=?@[]^_{|}~")
# Changeset links `r12`, and `(` after a letter or digit, which Redmine makes an abbreviation after a word in capitals.
_CHANGESET = re.compile(r"(?<![A-Za-z0-9_])r(?=\d)")
_ABBREVIATION_OPEN = re.compile(r"(?<=[A-Za-z0-9])\(")
# The colon of a Redmine link such as `commit:abc`, `source:path` or `attachment:file.txt`.
_LINK_COLON = re.compile(
    r"\b(attachment|document|version|forum|news|message|project|commit|source|export|user):", re.IGNORECASE
)
# A line that Redmine would take as a block signature such as `p. ` or `h1(class). `.
_BLOCK_SIGNATURE = re.compile(r"^([a-z])(?=[a-z]*\d*[.(])", re.MULTILINE)
# Characters a login can start with. Redmine reads `@login` after any non-word character as a mention.
_LOGIN_START = re.compile(r"[A-Za-z0-9_.\-]")
# Characters encoded in a URL so it cannot end the link early or carry a macro, wiki link or mention.
_URL_UNSAFE = re.compile(r"[\s\"<>{}\[\]|\\^`@]")

# Textile phrase markers by pandoc inline kind.
_PHRASE_MARKERS = {
    "Emph": "_",
    "Strong": "*",
    "Strikeout": "-",
    "Superscript": "^",
    "Subscript": "~",
    "Underline": "+",
}
_INLINE_BLOCKS = frozenset({"Plain", "Para", "LineBlock"})
_LIST_KINDS = frozenset({"BulletList", "OrderedList"})


class PandocFailed(Exception):
    """Pandoc could not read or write a text in time. `error_type` names the cause."""

    def __init__(self, error_type: str) -> None:
        super().__init__(f"pandoc failed: {error_type}")
        self.error_type = error_type


# Public entry points


def markdown_to_textile(markdown: str) -> str:
    """Write Markdown as Redmine Textile, or as one <pre> block when pandoc fails on it."""
    source = markup.clean_text(markdown)
    if not source.strip():
        return ""
    route = "markdown-redmine-textile"
    document = _document_or_none(source, route)
    if document is None:
        return textile_pre(source)
    try:
        return _TextileWriter().document(document["blocks"])
    except RecursionError:
        _log_failure(route, "RecursionError", source)
        return textile_pre(source)


def markdown_to_commonmark(markdown: str) -> str:
    """Write Markdown as Redmine CommonMark without images, raw HTML, macros or mentions."""
    route = "markdown-redmine-commonmark"
    source = markup.clean_text(markdown)
    if not source.strip():
        return ""
    document = _document_or_none(source, route)
    if document is None:
        return commonmark_fence(source)

    try:
        document["blocks"] = _inert_commonmark(document["blocks"])
        return _run_pandoc(json.dumps(document), "json", "gfm-raw_html")
    except PandocFailed as err:
        _log_failure(route, err.error_type, source)
    except RecursionError:
        _log_failure(route, "RecursionError", source)
    return commonmark_fence(source)


def textile_for_reading(textile: str) -> str:
    """Rewrite Redmine Textile so pandoc's Textile reader reads its code as code.

    Redmine's code button writes `<pre><code class="lang">`, which pandoc
    would show as tags inside the code, and the connector's own code spans
    carry character references that pandoc keeps as written.
    """
    text = re.sub(r"<pre>\s*<code(?:\s[^>]*)?>\n?", "<pre>\n", textile, flags=re.IGNORECASE)
    text = re.sub(r"\n?</code>\s*</pre>", "\n</pre>", text, flags=re.IGNORECASE)
    return re.sub(r"(?<![\w@])@([^@\n]+)@(?!\w)", _decoded_code_span, text)


def _decoded_code_span(match: re.Match[str]) -> str:
    # A decoded `@` would end the span early, so such a span keeps its references.
    decoded = html.unescape(match.group(1))
    return match.group(0) if "@" in decoded else f"@{decoded}@"


def textile_pre(text: str) -> str:
    """Put text into a <pre> block that Redmine shows character for character."""
    return f"<pre>\n{_OFFTAG.sub(lambda match: '<' + ZERO_WIDTH_SPACE + match.group(1) + match.group(2), text)}\n</pre>"


def commonmark_fence(text: str) -> str:
    """Put text into a fenced code block, longer than any backtick run in it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text}\n{fence}"


# Pandoc


def _document_or_none(source: str, route: str) -> dict[str, Any] | None:
    """Read Markdown into pandoc's document tree, or log why not and return None."""
    size = len(source.encode("utf-8"))
    if size > markup.MAX_PANDOC_INPUT_BYTES:
        log.warning("markup.too_large", extra={"route": route, "size_bytes": size})
        return None
    try:
        return _read_markdown(source)
    except PandocFailed as err:
        _log_failure(route, err.error_type, source)
    except RecursionError:
        # A deeply nested document is deeper than Python's recursion limit.
        _log_failure(route, "RecursionError", source)
    return None


def _log_failure(route: str, error_type: str, source: str) -> None:
    log.warning("markup.pandoc.failed", extra={"route": route, "error_type": error_type, "length": len(source)})


def _read_markdown(source: str) -> dict[str, Any]:
    try:
        document = json.loads(_run_pandoc(source, MARKDOWN_READER, "json"))
    except ValueError as err:
        raise PandocFailed(type(err).__name__) from err
    if not isinstance(document, dict) or not isinstance(document.get("blocks"), list):
        raise PandocFailed("NoBlocks")
    return document


def _run_pandoc(text: str, reader: str, writer: str) -> str:
    try:
        return markup.run_pandoc(text, reader, writer)
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        raise PandocFailed(type(err).__name__) from err


# Text escaping


def escape_text(text: str) -> str:
    """Write text as Textile that Redmine shows as written, with no markup or Redmine link in it."""
    text = _CHANGESET.sub("\0r", text.replace("\0", ""))
    text = _ABBREVIATION_OPEN.sub("\0(", text)
    text = _LINK_COLON.sub(lambda match: match.group(1) + "\0:", text)
    out: list[str] = []
    referenced = False
    for character in text:
        if character == "\0":
            referenced = True
            continue
        if character in _TEXT_REFERENCES:
            out.append(_TEXT_REFERENCES[character])
        elif referenced or character in _TEXT_NUMBERED:
            out.append(f"&#{ord(character)};")
        else:
            out.append(character)
        referenced = False
    return "".join(out)


def _escape_code(text: str) -> str:
    """Escape the text of a `@...@` code span, with its first character as a reference so that `@login` is no mention."""
    text = " ".join(text.split("\n"))
    if not text:
        return ""
    first = f"&#{ord(text[0])};" if _LOGIN_START.match(text[0]) else escape_text(text[0])
    return first + escape_text(text[1:])


def _encode_url(url: str) -> str:
    return _URL_UNSAFE.sub(lambda match: "".join(f"%{byte:02X}" for byte in match.group(0).encode("utf-8")), url)


def _safe_url(url: str) -> bool:
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", url.strip())
    return scheme is not None and scheme.group(1).lower() in markup.SAFE_URL_SCHEMES


def _plain_text(node: Any) -> str:
    """Return the text of a pandoc element without its markup, for alt texts and table cells."""
    parts: list[str] = []

    def visit(item: Any) -> None:
        if isinstance(item, list):
            for child in item:
                visit(child)
            return
        if not isinstance(item, dict):
            return
        kind = item.get("t")
        if kind == "Str":
            parts.append(item["c"])
        elif kind in ("Space", "SoftBreak", "LineBreak"):
            parts.append(" ")
        elif kind in ("Code", "Math", "RawInline", "CodeBlock", "RawBlock"):
            parts.append(item["c"][1])
        else:
            visit(item.get("c"))

    visit(node)
    return "".join(parts)


# Inline Textile, with markers decided once the whole line is known


@dataclass
class _Pair:
    """Markup around inline content, written natively only where Redmine will read it as such.

    `kind` is "phrase", "code", "link" or "url". A pair with `text_native`
    has no inner tokens and writes that text, or `text_plain` when it is not
    native.
    """

    kind: str
    open_native: str = ""
    close_native: str = ""
    open_plain: str = ""
    close_plain: str = ""
    text_native: str | None = None
    text_plain: str = ""
    native: bool = False


@dataclass
class _Mark:
    pair: _Pair
    opening: bool

    def written(self) -> str:
        pair = self.pair
        if self.opening:
            opening = pair.open_native if pair.native else pair.open_plain
            if pair.text_native is None:
                return opening
            return opening + (pair.text_native if pair.native else pair.text_plain)
        return pair.close_native if pair.native else pair.close_plain


@dataclass
class _Line:
    tokens: list[str | _Mark] = field(default_factory=list)

    def text(self, value: str) -> None:
        self.tokens.append(value)

    def render(self) -> str:
        self._decide()
        return "".join(token if isinstance(token, str) else token.written() for token in self.tokens)

    def _decide(self) -> None:
        """Keep each pair's native markup only where Redmine's rules for it hold, from left to right."""
        closing_index = {
            id(token.pair): index for index, token in enumerate(self.tokens) if isinstance(token, _Mark) and not token.opening
        }
        # Only the last two characters written so far are ever compared.
        tail = ""
        for index, token in enumerate(self.tokens):
            if isinstance(token, _Mark) and token.opening:
                self._decide_pair(token.pair, index, closing_index[id(token.pair)], tail)
            tail = (tail + (token if isinstance(token, str) else token.written()))[-2:]

    def _decide_pair(self, pair: _Pair, opening: int, closing: int, tail: str) -> None:
        if pair.text_native is not None:
            inner = pair.text_native
        else:
            inner = "".join(item for item in self.tokens[opening + 1 : closing] if isinstance(item, str))
        following = itertools.islice(self.tokens, closing + 1, None)
        after = next((item for item in following if isinstance(item, str) and item), "")
        before = _before_phrase(tail) if pair.kind == "phrase" else tail[-1:]
        pair.native = _fits(pair.kind, before, inner, after)


def _before_phrase(written: str) -> str:
    # One phrase marker may precede another (`*_x_*`), so it is skipped once.
    if written[-1:] in _PHRASE_MARKERS.values():
        return written[-2:-1]
    return written[-1:]


def _fits(kind: str, before: str, inner: str, after: str) -> bool:
    """Tell whether Redmine's RedCloth3 reads markers of this kind at this place."""
    if not inner.strip():
        return False
    if kind == "phrase":
        # QTAGS: an opening marker after the start, `>`, `(` or a space, and a closing one
        # before punctuation, `<`, `)`, a space or the end.
        return (before == "" or before in ">(" or before.isspace()) and (
            after == "" or after[0].isspace() or after[0] in "<)" or _is_punctuation(after[0])
        ) and not inner[0].isspace() and not inner[-1].isspace()
    if kind == "code":
        # CODE_RE: `@` between non-word characters.
        return not _is_word(before) and not _is_word(after[:1])
    if kind == "link" and "\n" in inner:
        return False
    if kind == "url" and not (before == "" or before.isspace() or before in "([,;>"):
        return False
    # LINK_RE and AUTO_LINK_RE: the URL ends at a space, `<` or the end, and a `.` or `,` before them stays
    # outside. A character reference right after the URL would become part of it.
    return re.match(r"[.,')]*(?:\s|<|$)", after) is not None


def _is_word(character: str) -> bool:
    return bool(character) and (character.isalnum() or character == "_")


def _is_punctuation(character: str) -> bool:
    return character.isascii() and not character.isalnum() and not character.isspace()


class _TextileWriter:
    """Write pandoc's document tree as Redmine Textile."""

    def document(self, blocks: list[Any]) -> str:
        return "\n\n".join(part for part in self.blocks(blocks) if part)

    # Blocks

    def blocks(self, blocks: list[Any]) -> list[str]:
        return [text for block in blocks if (text := self.block(block))]

    def block(self, block: dict[str, Any]) -> str:
        kind = block.get("t")
        content = block.get("c")
        if kind in ("Plain", "Para"):
            return self.paragraph(content)
        if kind == "LineBlock":
            return self.paragraph(_joined_lines(content))
        if kind == "Header":
            level, _attributes, inlines = content
            return f"h{min(max(level, 1), 6)}. " + self.inline_line(inlines).replace("\n", " ")
        if kind == "CodeBlock":
            return textile_pre(content[1]) if content[1].strip() else ""
        if kind == "RawBlock":
            return self.paragraph([{"t": "Str", "c": content[1]}])
        if kind == "BlockQuote":
            return _quoted(self.document(content))
        if kind in _LIST_KINDS:
            return self.list_block(block, "")
        if kind == "DefinitionList":
            return "\n\n".join(self.definition(term, definitions) for term, definitions in content)
        if kind == "Table":
            return self.table(content)
        if kind == "HorizontalRule":
            return "---"
        if kind == "Div":
            return self.document(content[1])
        if kind == "Figure":
            _attributes, caption, body = content
            return self.document([*body, *caption[1]])
        # A kind that newer pandoc versions may add keeps its text.
        return self.paragraph([{"t": "Str", "c": _plain_text(content)}])

    def paragraph(self, inlines: list[Any]) -> str:
        return _BLOCK_SIGNATURE.sub(lambda match: f"&#{ord(match.group(1))};", self.inline_line(inlines))

    def definition(self, term: list[Any], definitions: list[list[Any]]) -> str:
        parts = [self.paragraph(term)]
        parts.extend(self.document(blocks) for blocks in definitions)
        return "\n\n".join(part for part in parts if part)

    # Lists: each item is one line, continued by hard breaks. Any other block ends the list.

    def list_block(self, block: dict[str, Any], markers: str) -> str:
        parts: list[str] = []
        previous_is_line = False
        for is_line, text in self.list_segments(block, markers):
            if is_line and previous_is_line:
                parts[-1] += "\n" + text
            elif text:
                parts.append(text)
            previous_is_line = is_line
        return "\n\n".join(parts)

    def list_segments(self, block: dict[str, Any], markers: str) -> list[tuple[bool, str]]:
        """Return the list as (True, item line) and (False, block) segments."""
        if block["t"] == "BulletList":
            return self.item_segments(block["c"], markers + "*")
        (start, _style, _delimiter), items = block["c"]
        if start == 1 and all(_simple_item(item) for item in items):
            return self.item_segments(items, markers + "#")
        # Redmine numbers every `#` list from 1, so other lists keep their numbers as text.
        segments: list[tuple[bool, str]] = []
        for number, item in enumerate(items, start=start):
            lead, rest = _split_item(item)
            segments.append((True, f"{number}. " + self.paragraph(lead)))
            segments.extend((False, self.block(child)) for child in rest)
        return segments

    def item_segments(self, items: list[list[Any]], markers: str) -> list[tuple[bool, str]]:
        segments: list[tuple[bool, str]] = []
        for item in items:
            lead, rest = _split_item(item)
            segments.append((True, f"{markers} " + (self.paragraph(lead) or " ")))
            for child in rest:
                if child["t"] in _LIST_KINDS:
                    segments.extend(self.list_segments(child, markers))
                else:
                    segments.append((False, self.block(child)))
        return segments

    # Tables

    def table(self, content: list[Any]) -> str:
        _attributes, caption, _columns, head, bodies, foot = content
        lines = [self.table_row(row, header=True) for row in head[1]]
        for body in bodies:
            lines.extend(self.table_row(row, header=True) for row in body[2])
            lines.extend(self.table_row(row, header=False) for row in body[3])
        lines.extend(self.table_row(row, header=False) for row in foot[1])
        table = "\n".join(lines)
        caption_text = self.document(caption[1])
        return f"{table}\n\n{caption_text}" if caption_text else table

    def table_row(self, row: list[Any], *, header: bool) -> str:
        cells = []
        for cell in row[1]:
            text = self.inline_line(_cell_inlines(cell[4])).replace("\n", " ") or " "
            cells.append(("_. " if header else "") + text)
        return "|" + "|".join(cells) + "|"

    # Inlines

    def inline_line(self, inlines: list[Any]) -> str:
        line = _Line()
        self.inlines(inlines, line)
        return line.render()

    def inlines(self, inlines: list[Any], line: _Line) -> None:
        for inline in inlines:
            self.inline(inline, line)

    def inline(self, inline: dict[str, Any], line: _Line) -> None:
        kind = inline.get("t")
        content = inline.get("c")
        if kind == "Str":
            line.text(escape_text(content))
        elif kind in ("Space", "SoftBreak"):
            line.text(" ")
        elif kind == "LineBreak":
            line.text("\n")
        elif kind in _PHRASE_MARKERS:
            marker = _PHRASE_MARKERS[kind]
            self.wrapped(_Pair("phrase", marker, marker), content, line)
        elif kind == "Code":
            self.wrapped(_Pair("code", "@", "@"), [], line, text=_escape_code(content[1]))
        elif kind in ("Math", "RawInline"):
            line.text(escape_text(content[1]))
        elif kind == "Quoted":
            line.text("&quot;")
            self.inlines(content[1], line)
            line.text("&quot;")
        elif kind == "Link":
            self.link(content[1], content[2][0], line)
        elif kind == "Image":
            alt = content[1] or [{"t": "Str", "c": content[2][0]}]
            self.link(alt, content[2][0], line)
        elif kind == "Note":
            line.text(" (" + escape_text(_plain_text(content)) + ")")
        elif kind == "Span" and "emoji" in content[0][1]:
            # Pandoc reads `:name:` as an emoji, and the name is written back as it was.
            names = [value for key, value in content[0][2] if key == "data-emoji"]
            line.text(escape_text(f":{names[0]}:" if names else _plain_text(content[1])))
        elif kind in ("Span", "Cite"):
            self.inlines(content[-1], line)
        elif kind == "SmallCaps":
            self.inlines(content, line)
        else:
            line.text(escape_text(_plain_text(content)))

    def wrapped(self, pair: _Pair, inlines: list[Any], line: _Line, *, text: str | None = None) -> None:
        line.tokens.append(_Mark(pair, opening=True))
        if text is not None:
            line.text(text)
        self.inlines(inlines, line)
        line.tokens.append(_Mark(pair, opening=False))

    def link(self, inlines: list[Any], url: str, line: _Line) -> None:
        # Textile has no link inside a link, so a linked image shows as its alt text.
        inlines = _without_links(inlines)
        if not _safe_url(url):
            self.inlines(inlines, line)
            line.text(" (" + escape_text(url) + ")")
            return
        encoded = _encode_url(url)
        url_text = escape_text(url).replace(":", "&#58;")
        if not inlines or _plain_text(inlines) == url:
            # Redmine links a bare URL by itself where the text around allows it, and elsewhere it stays text.
            self.wrapped(_Pair("url", text_native=encoded, text_plain=url_text), [], line)
            return
        self.wrapped(_Pair("link", '"', f'":{encoded}', "", f" ({url_text})"), inlines, line)


def _without_links(inlines: list[Any]) -> list[Any]:
    """Replace the links and images among inlines with their text."""
    plain: list[Any] = []
    for inline in inlines:
        if isinstance(inline, dict) and inline.get("t") in ("Link", "Image"):
            plain.extend(_without_links(inline["c"][1]) or [{"t": "Str", "c": inline["c"][2][0]}])
        elif isinstance(inline, dict) and inline.get("t") in _PHRASE_MARKERS:
            plain.append({**inline, "c": _without_links(inline["c"])})
        else:
            plain.append(inline)
    return plain


def _quoted(text: str) -> str:
    """Prefix each line with `>`, except the lines inside <pre> blocks, which Redmine takes out before reading quotes."""
    out: list[str] = []
    in_pre = False
    for text_line in text.split("\n"):
        if in_pre:
            out.append(text_line)
            in_pre = text_line != "</pre>"
            continue
        out.append(f"> {text_line}" if text_line else ">")
        in_pre = re.fullmatch(r"[> ]*<pre>", text_line) is not None
    return "\n".join(out)


def _joined_lines(lines: list[list[Any]]) -> list[Any]:
    joined: list[Any] = []
    for text_line in lines:
        if joined:
            joined.append({"t": "LineBreak"})
        joined.extend(text_line)
    return joined


def _split_item(item: list[Any]) -> tuple[list[Any], list[Any]]:
    """Split a list item into the inlines of its leading paragraphs, joined by line breaks, and its other blocks."""
    lead: list[Any] = []
    index = 0
    while index < len(item) and item[index].get("t") in _INLINE_BLOCKS:
        block = item[index]
        inlines = _joined_lines(block["c"]) if block["t"] == "LineBlock" else block["c"]
        if lead:
            lead.append({"t": "LineBreak"})
        lead.extend(inlines)
        index += 1
    return lead, item[index:]


def _simple_item(item: list[Any]) -> bool:
    _lead, rest = _split_item(item)
    return all(block.get("t") in _LIST_KINDS for block in rest)


def _cell_inlines(blocks: list[Any]) -> list[Any]:
    inlines: list[Any] = []
    for block in blocks:
        if inlines:
            inlines.append({"t": "Space"})
        if block.get("t") in ("Plain", "Para"):
            inlines.extend(block["c"])
        elif block.get("t") == "CodeBlock":
            inlines.append({"t": "Code", "c": [["", [], []], block["c"][1]]})
        else:
            inlines.append({"t": "Str", "c": _plain_text(block)})
    return inlines


# CommonMark


def _inert_commonmark(node: Any) -> Any:
    """Rewrite images as links, unsafe links as text, and `{` and `@` in text as character references."""
    if isinstance(node, list):
        return [item for child in node for item in _expanded(child)]
    if isinstance(node, dict) and "c" in node:
        return {**node, "c": _inert_commonmark(node["c"])}
    return node


def _expanded(node: Any) -> Iterator[Any]:
    if not isinstance(node, dict):
        yield _inert_commonmark(node)
        return
    kind = node.get("t")
    if kind == "Str":
        yield from _referenced_pieces(node["c"])
        return
    # Pandoc's GitHub reader returns HTML tags as raw elements even without its raw_html extension.
    if kind == "RawInline":
        yield from _referenced_pieces(node["c"][1])
        return
    if kind == "RawBlock":
        yield {"t": "Para", "c": list(_referenced_pieces(node["c"][1]))}
        return
    if kind == "Image":
        _attributes, alt, (url, title) = node["c"]
        label = alt or [{"t": "Str", "c": url}]
        node = {"t": "Link", "c": [["", [], []], label, [url, title]]}
        kind = "Link"
    if kind == "Link" and not _safe_url(node["c"][2][0]):
        yield from _inert_commonmark(node["c"][1])
        yield from _referenced_pieces(f" ({node['c'][2][0]})")
        return
    yield _inert_commonmark(node)


def _referenced_pieces(text: str) -> Iterator[dict[str, Any]]:
    for piece in re.split(r"([{@])", text):
        if piece in ("{", "@"):
            yield {"t": "RawInline", "c": ["gfm", f"&#{ord(piece)};"]}
        elif piece:
            yield {"t": "Str", "c": piece}

