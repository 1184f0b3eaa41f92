"""Safe file names for attachments copied between MDR and a ticket system.

On both sides the uploader chooses the name, so a name may carry a path,
control characters or bidi overrides that make `invoice.exe` look like
`invoice.pdf`. The spool uses generated names, so no file is stored under
such a name. The connector cleans the name before sending it to the other
side and keeps letters of every script, emoji included.
"""

from __future__ import annotations

import re
import unicodedata

# The name used when nothing is left after cleaning.
FALLBACK_NAME = "attachment"
# Linux file systems such as ext4 allow 255 bytes per name and NTFS allows 255
# UTF-16 units, so a name of at most 255 UTF-8 bytes fits both.
MAX_NAME_BYTES = 255
# A suffix longer than this is taken for part of the name, not an extension.
MAX_EXTENSION_BYTES = 32

# Explicit bidi marks, embeddings, overrides and isolates: they reorder how
# the rest of the name is shown. Other format characters stay, because
# U+200D (zero width joiner) and variation selectors build emoji.
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# Unicode categories dropped: control characters (NUL, C0, DEL, C1), line and
# paragraph separators, and lone surrogates, which UTF-8 cannot encode.
DROPPED_CATEGORIES = frozenset({"Cc", "Zl", "Zp", "Cs"})
DRIVE_PREFIX = re.compile(r"^[A-Za-z]:")
# Device names Windows opens instead of a file, with any extension.
WINDOWS_DEVICE_NAMES = frozenset(
    {"con", "prn", "aux", "nul", *(f"com{digit}" for digit in range(10)), *(f"lpt{digit}" for digit in range(10))}
)
EDGE_CHARACTERS = ". \t\u00a0\u3000"


WINDOWS_RESERVED = re.compile(r'[<>"|?*]')


def safe_filename(name: str) -> str:
    """Return `name` without path parts, control characters, bidi overrides or Windows-reserved characters, at most 255 UTF-8 bytes.

    Leading dots and trailing dots and spaces go too, so a name cannot hide
    as a dot file or end in a dot that Windows drops. Cleaning a cleaned name
    changes nothing, so a name read back from the target compares equal.
    """
    visible = "".join(character for character in name if not _is_dropped(character))
    base = re.split(r"[/\\]", visible)[-1]
    # Characters Windows forbids in names; `"` also goes over the wire
    # percent-encoded, so a name with it would not match when read back.
    base = WINDOWS_RESERVED.sub("_", base)
    # Repeat until stable: `..C:name` only shows its drive prefix once the dots are gone.
    previous = None
    while base != previous:
        previous = base
        base = DRIVE_PREFIX.sub("", base).lstrip(EDGE_CHARACTERS).rstrip(EDGE_CHARACTERS)
    base = _avoid_device_name(base)
    base = _truncate(base, MAX_NAME_BYTES)
    return base or FALLBACK_NAME


def visible_name(name: str, max_characters: int = 300) -> str:
    """Return `name` for a caption or a log field: every character `safe_filename` drops shown as an escape.

    A bidi override or a newline in an original name would otherwise
    reorder the caption around it or forge a log line.
    """
    escaped = "".join(ascii(character)[1:-1] if _is_dropped(character) else character for character in name)
    if len(escaped) > max_characters:
        return escaped[: max_characters - 1] + "…"
    return escaped


def file_extension(name: str) -> str:
    """Return the extension of a file name in lower case without the dot, or "" when it has none.

    Only the last suffix counts: `logs.tar.gz` has the extension `gz`.
    """
    stem, extension = _split_extension(name)
    if not stem:
        return ""
    return extension[1:].lower()


def _is_dropped(character: str) -> bool:
    return character in BIDI_CONTROLS or unicodedata.category(character) in DROPPED_CATEGORIES


def _avoid_device_name(name: str) -> str:
    stem = name.split(".", 1)[0].rstrip(" ")
    if stem.lower() in WINDOWS_DEVICE_NAMES:
        return f"_{name}"
    return name


def _truncate(name: str, max_bytes: int) -> str:
    """Shorten the part before the extension until the whole name fits in `max_bytes` of UTF-8."""
    if len(name.encode("utf-8")) <= max_bytes:
        return name

    stem, extension = _split_extension(name)
    budget = max_bytes - len(extension.encode("utf-8"))
    encoded = stem.encode("utf-8")[:budget]
    # Cutting bytes can split a character, so the partial one is dropped.
    stem = encoded.decode("utf-8", errors="ignore")
    # A joiner or variation selector left at the end would glue onto the extension.
    stem = stem.rstrip("\u200d\ufe0e\ufe0f").rstrip(EDGE_CHARACTERS)
    return f"{stem}{extension}" if stem else extension.lstrip(".")


def _split_extension(name: str) -> tuple[str, str]:
    """Split `name` into the stem and the extension with its dot, which is "" when there is none."""
    stem, dot, suffix = name.rpartition(".")
    if not dot or not stem or not suffix or len(suffix.encode("utf-8")) > MAX_EXTENSION_BYTES:
        return name, ""
    return stem, f".{suffix}"
