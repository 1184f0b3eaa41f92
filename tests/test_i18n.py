"""Translations: every message the CLI shows has a Russian translation with the same placeholders."""

from __future__ import annotations

import ast
import string
from pathlib import Path

import pytest

from mdr_connector.connector import i18n
from mdr_connector.connector.attachments import format_size

ROOT = Path(__file__).resolve().parents[1]
SOURCE_FOLDERS = ("connector", "adapters")


def translatable_messages() -> dict[str, str]:
    """Every string literal passed to `_()` or `N_()` in the sources, with where it is used."""
    found: dict[str, str] = {}
    for folder in SOURCE_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Name)
                    and node.func.id in ("_", "N_")
                    and node.args
                    and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)
                ):
                    found.setdefault(node.args[0].value, f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def placeholders(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


def test_messages_are_found() -> None:
    """The scan finds the CLI's messages, so an empty result cannot pass the checks below."""
    assert len(translatable_messages()) > 40


@pytest.mark.parametrize(
    "module",
    [
        "connector/attachments.py",
        "connector/responses.py",
        "connector/status.py",
        "connector/ticket_requests.py",
        "connector/mapping.py",
        "adapters/jira/adapter.py",
    ],
)
def test_ticket_texts_are_found(module: str) -> None:
    """The scan finds the texts each module writes on tickets or in MDR, so the catalog checks cover them."""
    found = [where for where in translatable_messages().values() if where.startswith(f"{module}:")]

    assert found != []


def test_every_message_has_russian() -> None:
    """No user-facing message is left untranslated in the Russian catalog."""
    catalog = i18n.load_catalog("ru")
    missing = [f"{where}: {message!r}" for message, where in translatable_messages().items() if message not in catalog]

    assert missing == []


def test_russian_keeps_placeholders() -> None:
    """A translation uses exactly the placeholders of its English message."""
    catalog = i18n.load_catalog("ru")
    wrong = [
        message
        for message in translatable_messages()
        if message in catalog and placeholders(message) != placeholders(catalog[message])
    ]

    assert wrong == []


@pytest.mark.parametrize(
    ("explicit", "configured", "environment", "expected"),
    [
        (None, None, {"LANG": "ru_RU.UTF-8"}, "ru"),
        (None, None, {"LANG": "en_US.UTF-8"}, "en"),
        (None, "ru", {"LANG": "en_US.UTF-8"}, "ru"),
        ("en", "ru", {"LANG": "ru_RU.UTF-8"}, "en"),
        (None, None, {"MDR_CONNECTOR_LANG": "ru", "LANG": "en_US.UTF-8"}, "ru"),
        (None, None, {}, "en"),
    ],
    ids=["locale-ru", "locale-en", "config", "flag-wins", "variable", "nothing-set"],
)
def test_language_detection(explicit, configured, environment, expected, monkeypatch: pytest.MonkeyPatch) -> None:
    """--lang beats the config, which beats MDR_CONNECTOR_LANG, which beats the locale."""
    for variable in ("LC_ALL", "LC_MESSAGES", "LANG", "MDR_CONNECTOR_LANG"):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)

    assert i18n.detect_language(explicit=explicit, configured=configured) == expected


def test_po_parser_skips_fuzzy_and_joins_lines() -> None:
    """Multi-line entries are joined and fuzzy ones are not used."""
    catalog = i18n.parse_po(
        'msgid ""\nmsgstr "Content-Type: text/plain; charset=UTF-8\\n"\n\n'
        'msgid "one "\n"line"\nmsgstr "одна "\n"строка"\n\n'
        '#, fuzzy\nmsgid "guess"\nmsgstr "догадка"\n'
    )

    assert catalog == {"one line": "одна строка"}


def test_catalog_file_per_language() -> None:
    """The Russian catalog is read from locale/ru.po, and a language without a file has an empty catalog."""
    assert (ROOT / "connector" / "locale" / "ru.po").is_file()
    assert i18n.load_catalog("ru")
    assert i18n.load_catalog("xx") == {}


def test_message_follows_language() -> None:
    """A Message renders in the language it is shown in, its values too, and in English for logs."""
    size = format_size(2000)
    assert str(size) == "2.0 KiB (2000 bytes)"

    i18n.set_language("ru")
    assert str(size) == "2.0 КиБ (2000 Б)"
    assert f"{size}" == "2.0 КиБ (2000 Б)"
    assert size.english() == "2.0 KiB (2000 bytes)"
    assert i18n.current_language() == "ru"


def test_language_block_restores() -> None:
    """`language` sets the language for one block only, and an unsupported one means English."""
    i18n.set_language("ru")
    with i18n.language("en"):
        assert i18n.current_language() == "en"
        assert i18n._("none") == "none"
    with i18n.language("xx"):
        assert i18n.current_language() == "en"

    assert i18n.current_language() == "ru"
    assert i18n._("none") == "нет"


def test_text_in_each_language() -> None:
    """`in_each_language` renders a text once per language, without repeats, whatever the process language."""
    i18n.set_language("ru")

    assert i18n.in_each_language(lambda: i18n._("none")) == ["none", "нет"]
    assert i18n.in_each_language(lambda: "MDR_1") == ["MDR_1"]
    assert i18n.current_language() == "ru"
