"""Cleaning untrusted attachment names before they go to the other side."""

from __future__ import annotations

import pytest

from mdr_connector.connector.filenames import FALLBACK_NAME, MAX_NAME_BYTES, file_extension, safe_filename


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("report.pdf", "report.pdf"),
        ("../../etc/passwd", "passwd"),
        ("/var/tmp/dump.bin", "dump.bin"),
        ("..\\..\\Windows\\system.ini", "system.ini"),
        ("C:\\Users\\analyst\\notes.txt", "notes.txt"),
        ("C:notes.txt", "notes.txt"),
        ("..C:notes.txt", "notes.txt"),
        ("folder/sub\\mixed.log", "mixed.log"),
        ("pass\x00wd.txt", "passwd.txt"),
        ("line\nbreak\r\t.txt", "linebreak.txt"),
        ("bell\x07\x7f\x9b.txt", "bell.txt"),
        ("invoice\u202efdp.exe", "invoicefdp.exe"),
        ("\u2066isolated\u2069\u200f.txt", "isolated.txt"),
        ("para\u2029graph.txt", "paragraph.txt"),
        ("lone\udcffsurrogate.txt", "lonesurrogate.txt"),
        (".bashrc", "bashrc"),
        ("...hidden.txt", "hidden.txt"),
        ("trailing. . .", "trailing"),
        ("  spaced name.txt  ", "spaced name.txt"),
        ("CON", "_CON"),
        ("nul.tar.gz", "_nul.tar.gz"),
        ("com1.txt", "_com1.txt"),
        ("console.txt", "console.txt"),
    ],
    ids=lambda value: repr(value),
)
def test_cleaned_names(name: str, expected: str) -> None:
    """Path parts, control characters, bidi controls and edge dots go; the rest stays."""
    assert safe_filename(name) == expected


@pytest.mark.parametrize(
    "name",
    [
        "Отчёт о проверке.pdf",
        "журнал событий (копия).txt",
        "👨\u200d👩\u200d👧 семья.png",
        "🔥✅.log",
        "日本語のファイル.docx",
        "שלום.txt",
    ],
)
def test_non_ascii_names_kept(name: str) -> None:
    """Cyrillic, emoji with joiners, CJK and right-to-left letters pass unchanged."""
    assert safe_filename(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", "...", "/", "\\", "C:", "\x00\x01", "\u202e", "/etc/", " . "])
def test_empty_result_falls_back(name: str) -> None:
    """A name with nothing left becomes the fallback name."""
    assert safe_filename(name) == FALLBACK_NAME


@pytest.mark.parametrize(
    ("stem_character", "extension"),
    [("a", ".pdf"), ("я", ".docx"), ("😀", ".png"), ("ж", "")],
)
def test_long_name_capped_keeping_extension(stem_character: str, extension: str) -> None:
    """A long name is cut to 255 UTF-8 bytes before the extension, never inside a character."""
    name = stem_character * 400 + extension

    cleaned = safe_filename(name)

    assert len(cleaned.encode("utf-8")) <= MAX_NAME_BYTES
    assert len(cleaned.encode("utf-8")) > MAX_NAME_BYTES - 4
    assert cleaned.endswith(extension)
    assert set(cleaned.removesuffix(extension)) == {stem_character}


def test_cut_drops_dangling_joiner() -> None:
    """A cut inside an emoji sequence leaves no joiner in front of the extension."""
    name = "a" * 244 + "👨\u200d👩\u200d👧" + ".txt"

    cleaned = safe_filename(name)

    assert len(cleaned.encode("utf-8")) <= MAX_NAME_BYTES
    assert "\u200d.txt" not in cleaned
    assert cleaned.endswith(".txt")


def test_long_suffix_is_not_extension() -> None:
    """A suffix too long for an extension is cut like the rest of the name."""
    name = "x." + "y" * 400

    cleaned = safe_filename(name)

    assert len(cleaned.encode("utf-8")) == MAX_NAME_BYTES
    assert cleaned.startswith("x.yyy")
    assert file_extension(cleaned) == ""


@pytest.mark.parametrize(
    "name",
    ["../a/.b.txt. ", "C:D:\\e.pdf", ".." + "ё" * 300 + ".txt", "\u202eCON.txt", "x" * 300, "a\\..\\..", "👍" * 100],
)
def test_cleaning_is_idempotent(name: str) -> None:
    """Cleaning a cleaned name changes nothing, so names read back from a target compare equal."""
    once = safe_filename(name)

    assert safe_filename(once) == once


@pytest.mark.parametrize(
    ("name", "extension"),
    [
        ("report.PDF", "pdf"),
        ("logs.tar.gz", "gz"),
        ("README", ""),
        ("archive.", ""),
        (".env", ""),
        ("photo.JpEg", "jpeg"),
    ],
)
def test_file_extension(name: str, extension: str) -> None:
    """The extension is the last suffix, lower case, without the dot."""
    assert file_extension(name) == extension


@pytest.mark.parametrize(("name", "expected"), [('say "hi".txt', "say _hi_.txt"), ("a<b>c|d?*.log", "a_b_c_d__.log")])
def test_windows_reserved_characters_replaced(name: str, expected: str) -> None:
    """Characters Windows forbids become underscores, so the name also compares equal when read back."""
    assert safe_filename(name) == expected
