"""Translations of user-facing CLI messages (English by default, Russian on request).

Catalogs are standard gettext `.po` files, one per language at
`locale/<lang>.po`, read at start-up, so translators can use their usual
tools and no compile step is needed. Logs stay in English: they are for
machines and for search.
"""

from __future__ import annotations

import ast
import os
from importlib import resources

SUPPORTED = ("en", "ru")

_catalog: dict[str, str] = {}
_language = "en"


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
    global _catalog, _language
    _language = language if language in SUPPORTED else "en"
    _catalog = load_catalog(_language) if _language != "en" else {}


def current_language() -> str:
    return _language


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


def gettext(message: str) -> str:
    """Translate a message into the current language; unknown messages stay English."""
    return _catalog.get(message, message)


def mark(message: str) -> str:
    """Mark a message for translation where it is defined and translate it later with `_(variable)`."""
    return message


_ = gettext
N_ = mark
