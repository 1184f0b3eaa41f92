"""Split a Markdown comment that is too long for the ticket system into parts that each fit.

The limit is the adapter's `capabilities.max_comment_chars`, and lengths are
measured by the adapter's `comment_length`, so they count the text as the
ticket system stores it (for Jira, wiki markup in UTF-16 code units).

Cuts fall between blocks (at blank lines) where possible, then between
lines, then between words, and inside a word only when a word alone is too
long. Each part is Markdown that converts on its own, so no part leaves a
block open. A fenced code block cut in two is closed at the end of one part
and opened again, with the same fence and info string, in the next. A cut
inside a line escapes a character that would start a heading, list or quote
at the start of the next part, and repeats the `>` of a quoted line.
NOTE: an inline construct (emphasis, link, code span) that spans a cut
inside a line, and the header row of a table cut between rows, do not carry
over, so that text shows in the next part as plain text. A fenced code
block inside a quote or indented in a list item is not seen as a fence, so
a cut inside it leaves the block open in one part and unfenced in the next.
"""

from __future__ import annotations

import re
import unicodedata
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from mdr_connector.connector.i18n import N_, _

Measure = Callable[[str], Awaitable[int]]

PART_MARK = N_("_Part {part} of {parts}_")
# A cut inside a line goes to the last newline or space in the window, unless
# that would leave the piece shorter than this share of the window.
MIN_CUT_SHARE = 0.5
# A piece that measured too long is cut again to this share of its estimated room,
# so the next measurement usually fits.
CUT_MARGIN = 0.95

_FENCE_OPEN = re.compile(r"^( {0,3})(`{3,}|~{3,})([^`\n]*)$")
_QUOTE_PREFIX = re.compile(r"(?:[ \t]{0,3}>[ \t]?)+")
_LEADING_BLOCK_MARKER = re.compile(r"^[#>\-+*=|`~_]")
_LEADING_ORDERED_MARKER = re.compile(r"^(\d{1,9})([.)])")


class SplitError(ValueError):
    """A text that cannot be split within the limit, because one character alone is longer."""


@dataclass(frozen=True)
class _Piece:
    """A run of the body that goes into one part whole, with the text that joined it to the piece before."""

    text: str
    # "\n\n" between blocks, "\n" between lines, " " between words, "" inside a word.
    joint: str


def part_mark(part: int, parts: int) -> str:
    """Return the Markdown line that marks one part of a split comment, in the current language."""
    return _(PART_MARK).format(part=part, parts=parts)


async def split_markdown(body: str, limit: int, measure: Measure) -> list[str]:
    """Split a Markdown body into parts whose measured length is each at most `limit`, in order.

    Raises SplitError when a single character measures longer than `limit`.
    """
    pieces = deque(_blocks(body))
    parts: list[str] = []
    # Measured length per Markdown character, learned from each measurement.
    ratio = 1.0
    while pieces:
        part, ratio = await _next_part(pieces, limit, measure, ratio)
        parts.append(part)
    return parts


async def _next_part(pieces: deque[_Piece], limit: int, measure: Measure, ratio: float) -> tuple[str, float]:
    """Take the longest run of pieces from the front of `pieces` that fits `limit`, cutting a piece when one alone is too long."""
    chosen = [pieces.popleft()]
    length = len(chosen[0].text)
    while pieces and (length + len(pieces[0].joint) + len(pieces[0].text)) * ratio <= limit:
        piece = pieces.popleft()
        chosen.append(piece)
        length += len(piece.joint) + len(piece.text)

    while True:
        text = _joined(chosen)
        size = await measure(text)
        if size <= limit:
            return text, ratio
        ratio = max(ratio, size / len(text))

        if len(chosen) > 1:
            # Give back pieces until the estimate fits. At least one goes,
            # because the estimate of the whole run is its measured size.
            length = len(text)
            while len(chosen) > 1 and length * ratio > limit:
                piece = chosen.pop()
                pieces.appendleft(piece)
                length -= len(piece.joint) + len(piece.text)
            continue

        if len(text) <= 1:
            raise SplitError(f"one character measures {size}, more than the limit of {limit}")
        room = max(1, min(len(text) - 1, int(len(text) * limit / size * CUT_MARGIN)))
        first, *rest = _cut_piece(chosen[0], room)
        if not rest and first == chosen[0]:
            raise SplitError(f"a block measures {size} and cannot be cut below the limit of {limit}")
        pieces.extendleft(reversed(rest))
        chosen = [first]


def _joined(pieces: list[_Piece]) -> str:
    """Join pieces with the text that joined them in the body; the first piece's joint is the cut before the part."""
    return pieces[0].text + "".join(piece.joint + piece.text for piece in pieces[1:])


def _blocks(body: str) -> list[_Piece]:
    """Split a body at blank lines outside fenced code blocks; a fenced block stays one piece with its blank lines."""
    pieces: list[_Piece] = []
    block: list[str] = []
    joint = ""
    fence: str | None = None
    for line in body.split("\n"):
        if fence is not None:
            block.append(line)
            if _closes_fence(line, fence):
                # A fenced block is a piece of its own, so a cut of it can wrap exactly its content.
                pieces.append(_Piece("\n".join(block), joint))
                block, joint, fence = [], "\n", None
            continue
        if not line.strip():
            if block:
                pieces.append(_Piece("\n".join(block), joint))
                block, joint = [], "\n"
            joint += line + "\n"
            continue
        opening = _FENCE_OPEN.match(line)
        if opening is not None:
            if block:
                pieces.append(_Piece("\n".join(block), joint))
                block, joint = [], "\n"
            fence = opening.group(2)
        block.append(line)
    if block:
        pieces.append(_Piece("\n".join(block), joint))
    return pieces


def _closes_fence(line: str, fence: str) -> bool:
    stripped = line.strip()
    return len(line) - len(line.lstrip(" ")) <= 3 and len(stripped) >= len(fence) and set(stripped) == {fence[0]}


def _cut_piece(piece: _Piece, room: int) -> list[_Piece]:
    """Cut a piece into pieces of at most about `room` characters; the first keeps the piece's joint."""
    lines = piece.text.split("\n")
    opening = _FENCE_OPEN.match(lines[0])
    if opening is not None and len(lines) > 1:
        return _cut_fenced(piece, lines, room)

    cut: list[_Piece] = []
    rest, joint = piece.text, piece.joint
    while len(rest) > room:
        before = len(rest)
        head, separator, rest = _cut_text(rest, room)
        if len(rest) >= before:
            # The escape or quote prefix added to the rest outweighs the cut, as with a room of one character.
            raise SplitError(f"a text cannot be cut into pieces of {room} characters")
        cut.append(_Piece(head, joint))
        joint = separator
    cut.append(_Piece(rest, joint))
    return cut


def _cut_fenced(piece: _Piece, lines: list[str], room: int) -> list[_Piece]:
    """Cut a fenced code block into fenced blocks that each open with its opening line and end with a closing fence."""
    opening_line = lines[0]
    fence = _FENCE_OPEN.match(opening_line).group(2)  # type: ignore[union-attr]
    closed = len(lines) > 1 and _closes_fence(lines[-1], fence)
    content = "\n".join(lines[1:-1] if closed else lines[1:])
    closing = lines[-1] if closed else fence
    content_room = max(1, room - len(opening_line) - len(closing) - 2)

    cut: list[_Piece] = []
    joint = piece.joint
    rest = content
    while True:
        if len(rest) > content_room:
            head, _separator, rest = _cut_text(rest, content_room, in_code=True)
        else:
            head, rest = rest, ""
        cut.append(_Piece(f"{opening_line}\n{head}\n{closing}", joint))
        joint = "\n\n"
        if not rest:
            return cut


def _cut_text(text: str, room: int, *, in_code: bool = False) -> tuple[str, str, str]:
    """Cut `text` at most `room` characters in, at a newline, else a space, else anywhere.

    Returns the head, the separator dropped at the cut, and the rest. Outside
    code, the rest is changed so that it reads the same when it starts a part.
    """
    window = text[: room + 1]
    shortest = int(room * MIN_CUT_SHARE)
    newline = window.rfind("\n")
    space = window.rfind(" ")
    if newline >= max(shortest, 1):
        return text[:newline], "\n", text[newline + 1 :]
    if space >= max(shortest, 1) and not in_code:
        position, separator = space, " "
    elif newline > 0:
        return text[:newline], "\n", text[newline + 1 :]
    elif space > 0 and not in_code:
        position, separator = space, " "
    else:
        position, separator = _hard_cut(text, room, in_code), ""

    head, rest = text[:position], text[position + len(separator) :]
    if in_code:
        return head, separator, rest
    return head, separator, _continued(text, position, rest)


def _hard_cut(text: str, room: int, in_code: bool) -> int:
    """Return a cut position inside a word that leaves no escaping backslash at the end of the head."""
    position = _grapheme_start(text, max(1, min(room, len(text) - 1)))
    if in_code:
        return position
    backslashes = len(text[:position]) - len(text[:position].rstrip("\\"))
    if backslashes % 2 == 1 and position > 1:
        position -= 1
    return position


def _grapheme_start(text: str, position: int) -> int:
    """Move `position` back to the start of the character it falls in, as a reader sees characters.

    A cut must not separate a combining mark, a variation selector or a zero
    width joiner from the character before it, nor split a flag, which is a
    pair of regional indicators.
    """
    while position > 1 and (_continues_character(text[position]) or text[position - 1] == "\u200d"):
        position -= 1
    if position > 1 and _is_regional_indicator(text[position]):
        run = position
        while run > 0 and _is_regional_indicator(text[run - 1]):
            run -= 1
        if (position - run) % 2 == 1:
            position -= 1
    return position


def _continues_character(character: str) -> bool:
    return bool(unicodedata.combining(character)) or character in "\u200d\ufe0e\ufe0f" or (
        0x1F3FB <= ord(character) <= 0x1F3FF or 0xE0020 <= ord(character) <= 0xE007F
    )


def _is_regional_indicator(character: str) -> bool:
    return 0x1F1E6 <= ord(character) <= 0x1F1FF


def _continued(text: str, position: int, rest: str) -> str:
    """Prepare the rest of a line cut at `position` to start a part: keep its quote and escape a leading block marker."""
    line_start = text.rfind("\n", 0, position) + 1
    quote = _QUOTE_PREFIX.match(text, line_start)
    prefix = quote.group(0) if quote is not None and quote.end() <= position else ""
    if len(prefix) * 2 >= position:
        # A prefix as long as the text before the cut would keep the rest from getting shorter.
        prefix = ""
    stripped = rest.lstrip(" \t")
    if _LEADING_BLOCK_MARKER.match(stripped):
        stripped = "\\" + stripped
    else:
        stripped = _LEADING_ORDERED_MARKER.sub(r"\1\\\2", stripped, count=1)
    return prefix + stripped
