"""Translations of user-facing texts, English by default and Russian on request.

Catalogs are standard gettext `.po` files, one per language at
`locale/<lang>.po`, read at start-up, so translators can use their usual
tools and no compile step is needed.

CLI messages and the texts the connector writes on tickets and in MDR
(attachment notices, response views, decision echoes, command replies,
status and edit notes, incident-request replies, the truncation note)
follow the process language, `current_language()`. The CLI sets it from
--lang, the config's `language`, MDR_CONNECTOR_LANG or the locale. The
machine-read parts of those texts never change with the language:
markers, the `_mdr-connector: ..._` footer, command keywords, field
names, ids, file names and status names. So the connector still
recognises a note it wrote before a language switch. Where it compares
the text itself, `in_each_language` renders that text in every language.

Logs stay in English, because they are for machines and for search. A
`Message` keeps its template and values, so the same text can go to a
ticket in the current language and to a log in English.
"""

from __future__ import annotations

import ast
import contextlib
import os
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from importlib import resources

SUPPORTED = ("en", "ru")

_catalogs: dict[str, dict[str, str]] = {}
_language = "en"
# A language set for one block of rendering (`language`), ahead of the process language.
_override: ContextVar[str | None] = ContextVar("mdr_connector_language", default=None)


def detect_language(explicit: str | None = None, configured: str | None = None) -> str:
    """Pick the language: --lang, then the config file, then MDR_CONNECTOR_LANG, then the locale."""
    for candidate in (explicit, configured, os.environ.get("MDR_CONNECTOR_LANG")):
        if candidate:
            return candidate if candidate in SUPPORTED else "en"
    for variable in ("LC_ALL", "LC_MESSAGES", "LANG"):
        value = os.environ.get(variable, "")
        if value:
            return "ru" if value.lower().startswith("ru") else "en"
    return "en"


def set_language(language: str) -> None:
    """Set the process language; an unsupported one falls back to English."""
    global _language
    _language = language if language in SUPPORTED else "en"
    if _language != "en":
        _catalogs[_language] = load_catalog(_language)


def current_language() -> str:
    """Return the language texts are rendered in now: the one `language` set for this block, else the process one."""
    return _override.get() or _language


@contextlib.contextmanager
def language(language: str) -> Iterator[None]:
    """Render texts in `language` inside the block, whatever the process language.

    The setting is a context variable, so other asyncio tasks keep theirs
    even when the block awaits.
    """
    token = _override.set(language if language in SUPPORTED else "en")
    try:
        yield
    finally:
        _override.reset(token)


def in_each_language(render: Callable[[], str]) -> list[str]:
    """Render a text once per supported language, without repeats.

    For recognising a text the connector wrote before the language was
    switched, such as the comment it sent to MDR with a decision.
    """
    texts: list[str] = []
    for each in SUPPORTED:
        with language(each):
            texts.append(render())
    return list(dict.fromkeys(texts))


def load_catalog(language: str) -> dict[str, str]:
    resource = resources.files("mdr_connector.connector.locale").joinpath(f"{language}.po")
    if not resource.is_file():
        return {}
    return parse_po(resource.read_text(encoding="utf-8"))


def parse_po(text: str) -> dict[str, str]:
    """Read msgid/msgstr pairs of a .po file; untranslated and fuzzy entries are skipped."""
    catalog: dict[str, str] = {}
    msgid: list[str] = []
    msgstr: list[str] = []
    target: list[str] | None = None
    fuzzy = False

    def flush() -> None:
        key, value = "".join(msgid), "".join(msgstr)
        if key and value and not fuzzy:
            catalog[key] = value

    for line in text.splitlines() + [""]:
        line = line.strip()
        if line.startswith("#,") and "fuzzy" in line:
            fuzzy = True
        elif line.startswith("msgid "):
            msgid, msgstr = [], []
            target = msgid
            msgid.append(ast.literal_eval(line[6:]))
        elif line.startswith("msgstr "):
            target = msgstr
            msgstr.append(ast.literal_eval(line[7:]))
        elif line.startswith('"') and target is not None:
            target.append(ast.literal_eval(line))
        elif not line:
            flush()
            msgid, msgstr, target, fuzzy = [], [], None, False
    return catalog


def _catalog(language: str) -> dict[str, str]:
    if language == "en":
        return {}
    catalog = _catalogs.get(language)
    if catalog is None:
        catalog = _catalogs[language] = load_catalog(language)
    return catalog


def gettext(message: str) -> str:
    """Translate a message into the current language; unknown messages stay English."""
    return _catalog(current_language()).get(message, message)


def mark(message: str) -> str:
    """Mark a message for translation where it is defined and translate it later with `_(variable)`."""
    return message


class Message:
    """A translatable text with its values, rendered when shown: `str()` in the current language, `english()` for logs.

    The template is marked with `N_()` where the message is built. A value
    that is itself a Message is rendered in the same language as the text around it.
    """

    __slots__ = ("template", "values")

    def __init__(self, template: str, **values: object) -> None:
        self.template = template
        self.values = values

    def __str__(self) -> str:
        return gettext(self.template).format(**self.values)

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    def __repr__(self) -> str:
        return f"Message({self.template!r}, **{self.values!r})"

    def english(self) -> str:
        with language("en"):
            return str(self)


_ = gettext
N_ = mark
