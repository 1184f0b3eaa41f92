"""The hostile input corpus as data: what each case sends, where it enters, and what must come out.

Each group of cases runs as one sync scenario in its own test module: every
bad item of the group and a few good items go through the real engine
against the MDR and Jira simulators for three cycles. `payload` contains what
the group's test seeds. The expectations are checked the same way for every
case of a group:

- `reason_has`: substrings of the reason the incident is parked with, or
  of the logged error when there is nothing to park.
- `copy_has`: substrings of the copy on the other side (issue summary and
  description, Jira comment wiki markup, MDR comment HTML, or file name).
- `copy_lacks`: regular expressions that must not match the live part of
  that copy, which is the text outside a `{noformat}` block on Jira.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Where a hostile value enters the connector.
MDR_INCIDENT = "MDR incident field"
MDR_INCIDENT_LIST = "MDR incidents/list page"
MDR_COMMENT = "MDR comment"
MDR_COMMENT_LIST = "MDR comments/list reply"
MDR_ATTACHMENT_NAME = "MDR attachment name"
MDR_ATTACHMENT_CONTENT = "MDR attachment content"
MDR_ATTACHMENT_RECORD = "MDR attachment record"
MDR_RESPONSE = "MDR response record"
JIRA_COMMENT = "Jira comment"
JIRA_ATTACHMENT_NAME = "Jira attachment name"
JIRA_ATTACHMENT_CONTENT = "Jira attachment content"
JIRA_ISSUE_FIELD = "Jira issue field"
MDR_REPLY = "MDR API reply"
JIRA_REPLY = "Jira API reply"

# What happens to the hostile item.
# Not written; the incident is parked with a reason that names the field and the value.
PARKED = "parked"
# Written with the hostile part removed, escaped or cut, as `expected` states.
TRANSFORMED = "transformed"
# Written unchanged, because the value does no harm where it lands, as `expected` states.
KEPT = "kept"
# A file that is not copied: the other side gets one comment naming the file and the reason.
NOTICE = "notice"
# A record without a readable id: nothing can be parked under it, so the
# error is logged as `sync.incident.malformed` and the record is skipped.
LOGGED = "logged"
# A record listed twice: written once.
DEDUPLICATED = "deduplicated"
# A spoiled reply, sent once: the failure is logged or retried at once,
# and the item syncs once on the same or a later cycle.
RETRIED = "retried"
OUTCOMES = frozenset({PARKED, TRANSFORMED, KEPT, NOTICE, LOGGED, DEDUPLICATED, RETRIED})

# Groups, one sync scenario each.
INCIDENTS = "incidents"
MDR_COMMENTS = "mdr_comments"
MDR_FILES = "mdr_files"
MDR_RESPONSES = "mdr_responses"
JIRA_COMMENTS = "jira_comments"
JIRA_FILES = "jira_files"
JIRA_ISSUES = "jira_issues"
REPLIES = "replies"
GROUPS = (INCIDENTS, MDR_COMMENTS, MDR_FILES, MDR_RESPONSES, JIRA_COMMENTS, JIRA_FILES, JIRA_ISSUES, REPLIES)

# Jira wiki markup that renders as HTML, a script link, an image or a
# verbatim block, when it is not escaped with a backslash.
WIKI_HTML_MACRO = r"(?<![\\{])\{html\}"
WIKI_SCRIPT_LINK = r"(?<!\\)\[[^\]\n]*\|\s*javascript:"
WIKI_IMAGE = r"(?<![\\\w])![^!\s]+!"
WIKI_NOFORMAT = r"(?<![\\{])\{noformat\}"
WIKI_ACTIVE = (WIKI_HTML_MACRO, WIKI_SCRIPT_LINK, WIKI_IMAGE)
# HTML that runs a script or loads an image in the MDR console.
HTML_SCRIPT = r"(?i)<script"
HTML_IMAGE = r"(?i)<img"
HTML_SCRIPT_LINK = r"(?i)href\s*=\s*[\"']?\s*javascript:"
HTML_EVENT_HANDLER = r"(?i)<[^>]*\son\w+\s*="
HTML_ACTIVE = (HTML_SCRIPT, HTML_IMAGE, HTML_SCRIPT_LINK, HTML_EVENT_HANDLER)
# Markdown that the MDR console would render as raw HTML, an image or a
# script link. An autolink such as `<https://...>` is plain Markdown.
MARKDOWN_RAW_HTML = r"(?<!\\)<(?!https?://)[A-Za-z/!]"
MARKDOWN_IMAGE = r"(?<!\\)!\["
MARKDOWN_SCRIPT_LINK = r"\]\(\s*javascript:"
MARKDOWN_ACTIVE = (MARKDOWN_RAW_HTML, MARKDOWN_IMAGE, MARKDOWN_SCRIPT_LINK)

# 2100-01-01T00:00:00Z in epoch milliseconds.
YEAR_2100_MS = 4_102_444_800_000
# More characters than the 32,767 UTF-16 code units Jira takes in one text.
HUGE_TEXT_LENGTH = 70_000


@dataclass(frozen=True)
class Case:
    """One hostile input: what it is, where it enters, what the connector must do with it."""

    name: str
    group: str
    source: str
    hostile: str
    outcome: str
    expected: str
    payload: Mapping[str, Any] = field(default_factory=dict)
    reason_has: tuple[str, ...] = ()
    copy_has: tuple[str, ...] = ()
    copy_lacks: tuple[str, ...] = ()


CASES: tuple[Case, ...] = (
    # Incidents: fields of the incident record, read from incidents/list.
    Case(
        "incident_missing_summary", INCIDENTS, MDR_INCIDENT,
        "the record has no `summary` key",
        PARKED, "parked: the reason says the field is required",
        payload={"drop": ("summary",)},
        reason_has=("summary: Field required",),
    ),
    Case(
        "incident_number_as_string", INCIDENTS, MDR_INCIDENT,
        "`incident_number` is the string \"1336650\" instead of a number",
        PARKED, "parked: the reason names the field and shows the string",
        payload={"fields": {"incident_number": "1336650"}},
        reason_has=("incident_number", '(got "1336650")'),
    ),
    Case(
        "incident_summary_as_number", INCIDENTS, MDR_INCIDENT,
        "`summary` is the number 12345 instead of a string",
        PARKED, "parked: the reason names the field and shows the number",
        payload={"fields": {"summary": 12345}},
        reason_has=("summary", "(got 12345)"),
    ),
    Case(
        "incident_priority_null", INCIDENTS, MDR_INCIDENT,
        "`priority` is null",
        PARKED, "parked: the reason names the field and shows null",
        payload={"fields": {"priority": None}},
        reason_has=("priority", "(got null)"),
    ),
    Case(
        "incident_hosts_as_object", INCIDENTS, MDR_INCIDENT,
        "`affected_hosts` is an object instead of a list",
        PARKED, "parked: the reason says a list is expected",
        payload={"fields": {"affected_hosts": {"WS-FIN-001": "0xabc"}}},
        reason_has=("affected_hosts", "valid list"),
    ),
    Case(
        "incident_tactics_as_string", INCIDENTS, MDR_INCIDENT,
        "`mitre_tactics` is one string instead of a list",
        PARKED, "parked: the reason says a list is expected and shows the string",
        payload={"fields": {"mitre_tactics": "TA0002"}},
        reason_has=("mitre_tactics", '"TA0002"'),
    ),
    Case(
        "incident_creation_in_seconds", INCIDENTS, MDR_INCIDENT,
        "`creation_time` is in epoch seconds instead of milliseconds",
        PARKED, "parked: the reason says the value looks like seconds and to report the record",
        payload={"seconds": ("creation_time",)},
        reason_has=("creation_time", "looks like epoch seconds", "report the record to Kaspersky"),
    ),
    Case(
        "incident_creation_negative", INCIDENTS, MDR_INCIDENT,
        "`creation_time` is -1",
        PARKED, "parked: the reason names the field and the lower bound",
        payload={"fields": {"creation_time": -1}},
        reason_has=("creation_time", "greater than or equal to 0", "(got -1)"),
    ),
    Case(
        "incident_update_absurd", INCIDENTS, MDR_INCIDENT,
        "`update_time` lies after the year 9999",
        PARKED, "parked: the reason names the field and the upper bound; the cursor does not move to it",
        payload={"fields": {"update_time": 10**16}},
        reason_has=("update_time", "less than or equal to", "(got 10000000000000000)"),
    ),
    Case(
        "incident_update_in_future", INCIDENTS, MDR_INCIDENT,
        "`update_time` is in the year 2100",
        PARKED, "parked: the reason says the time is ahead of the clock; the cursor does not move to it",
        payload={"fields": {"update_time": YEAR_2100_MS}},
        reason_has=("ahead of this machine's clock",),
    ),
    Case(
        "incident_creation_in_future", INCIDENTS, MDR_INCIDENT,
        "`creation_time` is in the year 2100",
        KEPT, "synced: `creation_time` moves no cursor, so the description shows the date MDR sent",
        payload={"fields": {"creation_time": YEAR_2100_MS}},
        copy_has=("2100-01-01",),
    ),
    Case(
        "incident_id_jql_injection", INCIDENTS, MDR_INCIDENT,
        "`incident_id` is a JQL clause: `x\" OR labels is not EMPTY --`",
        PARKED, "parked: the reason says the id has characters other than letters, digits, - and _; no search is made with it",
        payload={"fields": {"incident_id": 'x" OR labels is not EMPTY --'}},
        reason_has=("x\" OR labels is not EMPTY --", "characters other than letters"),
    ),
    Case(
        "incident_id_sql_injection", INCIDENTS, MDR_INCIDENT,
        "`incident_id` is an SQL statement: `1'; DROP TABLE links; --`",
        PARKED, "parked: the same id check; the ledger stores the id as a bound value and keeps working",
        payload={"fields": {"incident_id": "1'; DROP TABLE links; --"}},
        reason_has=("DROP TABLE links", "characters other than letters"),
    ),
    Case(
        "incident_id_empty", INCIDENTS, MDR_INCIDENT,
        "`incident_id` is empty",
        LOGGED, "skipped: logged as sync.incident.malformed with `<without incident_id>`; no ticket",
        payload={"fields": {"incident_id": ""}},
        reason_has=("<without incident_id>",),
    ),
    Case(
        "incident_id_overlong", INCIDENTS, MDR_INCIDENT,
        "`incident_id` has 300 characters, more than the ledger's 200",
        LOGGED, "skipped: logged as sync.incident.malformed, naming the field and its limit; no ticket",
        payload={"fields": {"incident_id": "A" * 300}},
        reason_has=("incident_id", "at most 200 characters"),
    ),
    Case(
        "incident_listed_twice", INCIDENTS, MDR_INCIDENT_LIST,
        "one incidents/list page holds the same incident twice",
        DEDUPLICATED, "one ticket, created once",
        payload={"repeat": True},
    ),
    Case(
        "incident_priority_unknown", INCIDENTS, MDR_INCIDENT,
        "`priority` is CRITICAL, which MDR does not define",
        TRANSFORMED, "synced without a Jira priority, so Jira's default applies; the description shows CRITICAL",
        payload={"fields": {"priority": "CRITICAL"}},
        copy_has=("priority=Medium", "*Priority:* CRITICAL"),
    ),
    Case(
        "incident_status_unknown", INCIDENTS, MDR_INCIDENT,
        "`status` is Exploded, which neither MDR nor the mapping defines",
        PARKED, "ticket created, then parked: the reason names the status and `status.to_ticket`",
        payload={"fields": {"status": "Exploded"}, "ticket_created": True},
        reason_has=("Exploded", "status.to_ticket"),
    ),
    Case(
        "incident_resolution_unknown", INCIDENTS, MDR_INCIDENT,
        "`resolution` is Maybe, which MDR does not define",
        KEPT, "synced: the connector reads no incident resolution, so the value has no effect",
        payload={"fields": {"resolution": "Maybe"}},
    ),
    Case(
        "incident_summary_control_characters", INCIDENTS, MDR_INCIDENT,
        "the summary holds NUL, BEL and an ANSI escape sequence",
        TRANSFORMED, "NUL, BEL and ESC are removed; the printable rest stays",
        payload={"fields": {"summary": "Alert\x00\x07\x1b[31m on host"}},
        copy_has=("Alert[31m on host",),
        copy_lacks=("[\x00-\x08\x1b]",),
    ),
    Case(
        "incident_summary_bidi_override", INCIDENTS, MDR_INCIDENT,
        "the summary holds U+202E (right-to-left override): `invoice\\u202egpj.exe` shows as `invoiceexe.jpg`",
        KEPT, "kept: texts keep bidi controls, which right-to-left scripts need; only file names drop them",
        payload={"fields": {"summary": "invoice\u202egpj.exe"}},
        copy_has=("invoice\u202egpj.exe",),
    ),
    Case(
        "incident_summary_astral_overlong", INCIDENTS, MDR_INCIDENT,
        "the summary is 200 emoji, 400 UTF-16 code units, more than Jira's 255",
        TRANSFORMED, "cut to 255 UTF-16 code units ending in `…`, never inside a surrogate pair",
        payload={"fields": {"summary": "\U0001f9a0" * 200}},
        copy_has=("\U0001f9a0…",),
    ),
    Case(
        "incident_description_70k", INCIDENTS, MDR_INCIDENT,
        "the description has 70,000 characters, more than Jira's 32,767",
        TRANSFORMED, "cut to 32,767 with the line `truncated by mdr-connector: the full text is in Kaspersky MDR`",
        payload={"fields": {"description": "d" * HUGE_TEXT_LENGTH + " END"}},
        copy_has=("truncated by mdr-connector: the full text is in Kaspersky MDR",),
    ),
    Case(
        "incident_description_script", INCIDENTS, MDR_INCIDENT,
        "the description holds `<script>` and `<img onerror>` HTML",
        TRANSFORMED, "shown as text: Jira wiki markup renders no HTML, and no wiki image or link is made of it",
        payload={"fields": {"description": '<script>alert(1)</script><img src=x onerror="alert(2)">'}},
        copy_has=("<script>alert(1)</script>",),
        copy_lacks=WIKI_ACTIVE,
    ),
    Case(
        "incident_description_html_macro", INCIDENTS, MDR_INCIDENT,
        "the description holds the Jira macro `{html}<b>x</b>{html}`",
        TRANSFORMED, "the macro is escaped and shows as text",
        payload={"fields": {"description": "{html}<b>x</b>{html}"}},
        copy_lacks=WIKI_ACTIVE,
    ),
    Case(
        "incident_description_script_link", INCIDENTS, MDR_INCIDENT,
        "the description holds `[a|javascript:alert(3)]` and `[b](javascript:alert(4))`",
        TRANSFORMED, "no javascript: link on Jira",
        payload={"fields": {"description": "[a|javascript:alert(3)] [b](javascript:alert(4))"}},
        copy_lacks=WIKI_ACTIVE,
    ),
    Case(
        "incident_description_image", INCIDENTS, MDR_INCIDENT,
        "the description embeds remote images: `!http://evil.example/x.png!` and `![x](http://evil.example/y.png)`",
        TRANSFORMED, "no image on Jira: the addresses show as text or links",
        payload={"fields": {"description": "!http://evil.example/x.png! ![x](http://evil.example/y.png)"}},
        copy_lacks=WIKI_ACTIVE,
    ),
    Case(
        "incident_description_noformat_breakout", INCIDENTS, MDR_INCIDENT,
        "the description closes a `{noformat}` block that the connector may wrap around it, then adds a macro",
        TRANSFORMED, "the tag is escaped, so the text cannot leave a verbatim block",
        payload={"fields": {"description": "{noformat} {html}<i>x</i>{html}"}},
        copy_lacks=WIKI_ACTIVE,
    ),
    Case(
        "incident_tenant_markup", INCIDENTS, MDR_INCIDENT,
        "`tenant_name` holds wiki and Markdown links to javascript:",
        TRANSFORMED, "no javascript: link on Jira",
        payload={"fields": {"tenant_name": "[t|javascript:alert(5)] [u](javascript:alert(6))"}},
        copy_lacks=WIKI_ACTIVE,
    ),
    # MDR comments of one incident.
    Case(
        "comment_missing_text", MDR_COMMENTS, MDR_COMMENT,
        "the comment has no `text` key",
        PARKED, "not copied; the incident is parked with the comment id and `text: Field required`",
        payload={"drop": ("text",)},
        reason_has=("text: Field required",),
    ),
    Case(
        "comment_text_null", MDR_COMMENTS, MDR_COMMENT,
        "the comment's `text` is null",
        PARKED, "not copied; the reason names the comment, the field and null",
        payload={"fields": {"text": None}},
        reason_has=("text", "(got null)"),
    ),
    Case(
        "comment_time_as_string", MDR_COMMENTS, MDR_COMMENT,
        "`creation_time` is the string \"yesterday\"",
        PARKED, "not copied; the reason names the field and shows the string",
        payload={"fields": {"creation_time": "yesterday"}},
        reason_has=("creation_time", '"yesterday"'),
    ),
    Case(
        "comment_time_in_seconds", MDR_COMMENTS, MDR_COMMENT,
        "`creation_time` is in epoch seconds",
        PARKED, "not copied; the reason says the value looks like seconds",
        payload={"seconds": ("creation_time",)},
        reason_has=("creation_time", "looks like epoch seconds"),
    ),
    Case(
        "comment_author_as_object", MDR_COMMENTS, MDR_COMMENT,
        "`author_name` is an object instead of a string",
        PARKED, "not copied; the reason names the field",
        payload={"fields": {"author_name": {"name": "SOC"}}},
        reason_has=("author_name", "valid string"),
    ),
    Case(
        "comment_control_characters", MDR_COMMENTS, MDR_COMMENT,
        "the text holds NUL, BEL and an ANSI escape sequence",
        TRANSFORMED, "NUL, BEL and ESC are removed; the printable rest stays",
        payload={"text": "<p>n\x00u\x07l\x1b[31m</p>"},
        copy_has=("nul[31m",),
        copy_lacks=("[\x00-\x08\x1b]",),
    ),
    Case(
        "comment_bidi_override", MDR_COMMENTS, MDR_COMMENT,
        "the text holds U+202E (right-to-left override)",
        KEPT, "kept: texts keep bidi controls, which right-to-left scripts need",
        payload={"text": "<p>file \u202egpj.exe</p>"},
        copy_has=("file \u202egpj.exe",),
    ),
    Case(
        "comment_astral_characters", MDR_COMMENTS, MDR_COMMENT,
        "the text holds emoji, a mathematical letter and a ZWJ sequence, all outside the Basic Multilingual Plane",
        KEPT, "kept whole",
        payload={"text": "<p>\U0001f9a0 \U0001d54f \U0001f469\u200d\U0001f4bb</p>"},
        copy_has=("\U0001f9a0 \U0001d54f \U0001f469\u200d\U0001f4bb",),
    ),
    Case(
        "comment_script_tag", MDR_COMMENTS, MDR_COMMENT,
        "the HTML holds `<script>alert(1)</script>`",
        TRANSFORMED, "the script element is dropped, as a browser shows nothing of it",
        payload={"text": "<p>before<script>alert(1)</script>after</p>"},
        copy_has=("before", "after"),
        copy_lacks=(r"alert\(1\)", *WIKI_ACTIVE),
    ),
    Case(
        "comment_image_onerror", MDR_COMMENTS, MDR_COMMENT,
        "the HTML holds `<img src=... onerror=...>`",
        TRANSFORMED, "the image becomes a plain link to its address; the handler is dropped",
        payload={"text": '<p>c<img src="http://evil.example/x.png" onerror="alert(2)">d</p>'},
        copy_lacks=("onerror", *WIKI_ACTIVE),
    ),
    Case(
        "comment_script_href", MDR_COMMENTS, MDR_COMMENT,
        "the HTML holds `<a href=\"javascript:alert(3)\">`",
        TRANSFORMED, "the link text stays and the javascript: address becomes inert text",
        payload={"text": '<p><a href="javascript:alert(3)">click</a></p>'},
        copy_has=("click",),
        copy_lacks=WIKI_ACTIVE,
    ),
    Case(
        "comment_wiki_html_macro", MDR_COMMENTS, MDR_COMMENT,
        "the text holds the Jira macro `{html}<b>x</b>{html}`",
        TRANSFORMED, "the macro braces are escaped",
        payload={"text": "<p>{html}<b>x</b>{html}</p>"},
        copy_lacks=WIKI_ACTIVE,
    ),
    Case(
        "comment_wiki_script_link", MDR_COMMENTS, MDR_COMMENT,
        "the text holds the wiki link `[x|javascript:alert(4)]`",
        TRANSFORMED, "the brackets are escaped, so no link",
        payload={"text": "<p>[x|javascript:alert(4)]</p>"},
        copy_lacks=WIKI_ACTIVE,
    ),
    Case(
        "comment_wiki_image", MDR_COMMENTS, MDR_COMMENT,
        "the text holds the wiki image `!http://evil.example/y.png!`",
        TRANSFORMED, "the exclamation marks are escaped, so no image",
        payload={"text": "<p>!http://evil.example/y.png!</p>"},
        copy_lacks=WIKI_ACTIVE,
    ),
    Case(
        "comment_noformat_breakout", MDR_COMMENTS, MDR_COMMENT,
        "the text holds `{noformat}` and `{code}` tags",
        TRANSFORMED, "the tags are escaped",
        payload={"text": "<p>{noformat}</p><p>after {code}x</p>"},
        copy_lacks=(WIKI_NOFORMAT, r"(?<![\\{])\{code\}"),
    ),
    Case(
        "comment_70k", MDR_COMMENTS, MDR_COMMENT,
        "the text has 70,000 characters, more than Jira's 32,767 per comment",
        TRANSFORMED, "split into 3 comments of at most 32,767, each with the header and `Part k of 3`; "
        "test_long_comment_arrives_whole counts the characters",
        payload={"text": "<p>" + "y" * HUGE_TEXT_LENGTH + " END</p>"},
        copy_has=("Part 1 of 3",),
    ),
    Case(
        "comment_listed_twice", MDR_COMMENTS, MDR_COMMENT_LIST,
        "one comments/list reply holds the same comment twice",
        DEDUPLICATED, "one copy on Jira",
        payload={"text": "<p>listed twice</p>", "repeat": True},
        copy_has=("listed twice",),
    ),
    Case(
        "comment_time_in_future", MDR_COMMENTS, MDR_COMMENT,
        "`creation_time` is in the year 2100",
        KEPT, "copied once: the header shows the date MDR sent, and comment times move no cursor",
        payload={"text": "<p>from the future</p>", "fields": {"creation_time": YEAR_2100_MS}},
        copy_has=("2100-01-01", "from the future"),
    ),
    # MDR attachments of one incident.
    Case(
        "file_relative_traversal", MDR_FILES, MDR_ATTACHMENT_NAME,
        "the name is `../../etc/passwd`",
        TRANSFORMED, "the path parts are removed: `passwd`",
        payload={"name": "../../etc/passwd"}, copy_has=("passwd",),
    ),
    Case(
        "file_backslash_traversal", MDR_FILES, MDR_ATTACHMENT_NAME,
        "the name is `..\\..\\boot.ini`",
        TRANSFORMED, "the path parts are removed: `boot.ini`",
        payload={"name": "..\\..\\boot.ini"}, copy_has=("boot.ini",),
    ),
    Case(
        "file_absolute_path", MDR_FILES, MDR_ATTACHMENT_NAME,
        "the name is `/etc/shadow`",
        TRANSFORMED, "the path is removed: `shadow`",
        payload={"name": "/etc/shadow"}, copy_has=("shadow",),
    ),
    Case(
        "file_drive_path", MDR_FILES, MDR_ATTACHMENT_NAME,
        "the name is `C:\\Windows\\win.ini`",
        TRANSFORMED, "the drive and folders are removed: `win.ini`",
        payload={"name": "C:\\Windows\\win.ini"}, copy_has=("win.ini",),
    ),
    Case(
        "file_drive_relative", MDR_FILES, MDR_ATTACHMENT_NAME,
        "the name is `C:evil.txt`, a path relative to drive C",
        TRANSFORMED, "the drive prefix is removed: `evil.txt`",
        payload={"name": "C:evil.txt"}, copy_has=("evil.txt",),
    ),
    Case(
        "file_device_con", MDR_FILES, MDR_ATTACHMENT_NAME,
        "the name is the Windows device `CON`",
        TRANSFORMED, "prefixed: `_CON`",
        payload={"name": "CON"}, copy_has=("_CON",),
    ),
    Case(
        "file_device_prn", MDR_FILES, MDR_ATTACHMENT_NAME,
        "the name is the Windows device `PRN` with an extension",
        TRANSFORMED, "prefixed: `_PRN.txt`",
        payload={"name": "PRN.txt"}, copy_has=("_PRN.txt",),
    ),
    Case(
        "file_device_aux", MDR_FILES, MDR_ATTACHMENT_NAME,
        "the name is the Windows device `aux` in lower case",
        TRANSFORMED, "prefixed: `_aux`",
        payload={"name": "aux"}, copy_has=("_aux",),
    ),
    Case(
        "file_device_nul", MDR_FILES, MDR_ATTACHMENT_NAME,
        "the name is the Windows device `NUL` with an extension",
        TRANSFORMED, "prefixed: `_NUL.log`",
        payload={"name": "NUL.log"}, copy_has=("_NUL.log",),
    ),
    Case(
        "file_device_com1", MDR_FILES, MDR_ATTACHMENT_NAME,
        "the name is the Windows device `COM1` with an extension",
        TRANSFORMED, "prefixed: `_COM1.txt`",
        payload={"name": "COM1.txt"}, copy_has=("_COM1.txt",),
    ),
    Case(
        "file_device_lpt1", MDR_FILES, MDR_ATTACHMENT_NAME,
        "the name is the Windows device `LPT1`",
        TRANSFORMED, "prefixed: `_LPT1`",
        payload={"name": "LPT1"}, copy_has=("_LPT1",),
    ),
    Case(
        "file_trailing_dot_space", MDR_FILES, MDR_ATTACHMENT_NAME,
        "the name ends in a dot and a space, which Windows drops",
        TRANSFORMED, "trimmed: `report.txt`",
        payload={"name": "report.txt. "}, copy_has=("report.txt",),
    ),
    Case(
        "file_reserved_characters", MDR_FILES, MDR_ATTACHMENT_NAME,
        "the name holds `<`, `>`, `?` and `*`, which Windows forbids in names",
        TRANSFORMED, "each becomes `_`: `a_b_c__.txt`",
        payload={"name": "a<b>c?*.txt"}, copy_has=("a_b_c__.txt",),
    ),
    Case(
        "file_bidi_spoof", MDR_FILES, MDR_ATTACHMENT_NAME,
        "the name `invoice\\u202etxt.exe` shows as `invoiceexe.txt` but is an .exe",
        NOTICE, "the override is removed, so the name is `invoicetxt.exe`, which the .exe filter keeps back: a notice names it",
        payload={"name": "invoice\u202etxt.exe"},
        copy_has=("invoicetxt.exe", "extension .exe"),
    ),
    Case(
        "file_nul_in_name", MDR_FILES, MDR_ATTACHMENT_NAME,
        "the name holds NUL: `a\\x00b.txt`",
        TRANSFORMED, "NUL is removed: `ab.txt`",
        payload={"name": "a\x00b.txt"}, copy_has=("ab.txt",),
    ),
    Case(
        "file_overlong_name", MDR_FILES, MDR_ATTACHMENT_NAME,
        "the name has 304 bytes of UTF-8, more than the 255 file systems allow",
        TRANSFORMED, "cut before the extension to at most 255 bytes, keeping `.log`",
        payload={"name": "\u044f" * 150 + ".log"}, copy_has=(".log",),
    ),
    Case(
        "file_astral_name", MDR_FILES, MDR_ATTACHMENT_NAME,
        "the name holds Cyrillic and an emoji",
        KEPT, "kept unchanged",
        payload={"name": "\u041e\u0442\u0447\u0451\u0442 \U0001f525.txt"},
        copy_has=("\u041e\u0442\u0447\u0451\u0442 \U0001f525.txt",),
    ),
    Case(
        "file_zero_bytes", MDR_FILES, MDR_ATTACHMENT_CONTENT,
        "the file is empty",
        KEPT, "copied as an empty file",
        payload={"name": "empty.txt", "content": b""}, copy_has=("empty.txt",),
    ),
    Case(
        "file_over_limit", MDR_FILES, MDR_ATTACHMENT_CONTENT,
        "the file has 5,000 bytes, more than the mapping's limit of 1,000",
        NOTICE, "not downloaded: a notice names the file and the limit",
        payload={"name": "big.bin", "size": 5000},
        copy_has=("big.bin", "larger than the limit of 1000 bytes"),
    ),
    Case(
        "file_size_as_string", MDR_FILES, MDR_ATTACHMENT_RECORD,
        "`file_size` is the string \"1 KB\"",
        PARKED, "not copied; the reason names the attachment, the field and the string",
        payload={"name": "size.txt", "fields": {"file_size": "1 KB"}},
        reason_has=("file_size", '"1 KB"'),
    ),
    Case(
        "file_name_as_list", MDR_FILES, MDR_ATTACHMENT_RECORD,
        "`full_name` is a list",
        PARKED, "not copied; the reason names the field and shows the list",
        payload={"name": "list.txt", "fields": {"full_name": ["a", "b"]}},
        reason_has=("full_name", '["a", "b"]'),
    ),
    Case(
        "file_missing_name", MDR_FILES, MDR_ATTACHMENT_RECORD,
        "the record has no `full_name` key",
        PARKED, "not copied; the reason says the field is required",
        payload={"name": "gone.txt", "drop": ("full_name",)},
        reason_has=("full_name: Field required",),
    ),
    # MDR responses of one incident.
    Case(
        "response_status_unknown", MDR_RESPONSES, MDR_RESPONSE,
        "`status` is Exploded, which MDR does not define",
        TRANSFORMED, "shown on Jira as text, with the line that it can no longer be decided",
        payload={"fields": {"status": "Exploded"}},
        copy_has=("status *Exploded*", "can no longer be decided"),
    ),
    Case(
        "response_parameters_as_list", MDR_RESPONSES, MDR_RESPONSE,
        "`parameters` is a list instead of an object",
        PARKED, "not shown; the reason names the response, the field and the list",
        payload={"fields": {"parameters": ["-enc", "AAAA"]}},
        reason_has=("parameters", "valid dictionary", '["-enc", "AAAA"]'),
    ),
    Case(
        "response_missing_status", MDR_RESPONSES, MDR_RESPONSE,
        "the record has no `status` key",
        PARKED, "not shown; the reason says the field is required",
        payload={"drop": ("status",)},
        reason_has=("status: Field required",),
    ),
    Case(
        "response_markup", MDR_RESPONSES, MDR_RESPONSE,
        "the description holds a `{html}` macro, a javascript: link and an image",
        TRANSFORMED, "shown as escaped text",
        payload={"fields": {"description": "{html}<b>x</b>{html} [x|javascript:alert(1)] !http://evil.example/r.png!"}},
        copy_lacks=WIKI_ACTIVE,
    ),
    # Jira comments on one linked issue.
    Case(
        "jira_comment_script_tag", JIRA_COMMENTS, JIRA_COMMENT,
        "the comment holds `<script>alert(1)</script>`",
        TRANSFORMED, "escaped: MDR shows `&lt;script&gt;` as text",
        payload={"body": "<script>alert(1)</script>"},
        copy_has=("&lt;script&gt;",),
        copy_lacks=HTML_ACTIVE,
    ),
    Case(
        "jira_comment_html_macro", JIRA_COMMENTS, JIRA_COMMENT,
        "the comment holds `{html}<img src=x onerror=alert(1)>{html}`",
        TRANSFORMED, "escaped: the tag shows as text in MDR",
        payload={"body": "{html}<img src=x onerror=alert(1)>{html}"},
        copy_lacks=HTML_ACTIVE,
    ),
    Case(
        "jira_comment_script_link", JIRA_COMMENTS, JIRA_COMMENT,
        "the comment holds the wiki link `[x|javascript:alert(2)]`",
        TRANSFORMED, "no link in MDR: the text stays",
        payload={"body": "[x|javascript:alert(2)]"},
        copy_lacks=HTML_ACTIVE,
    ),
    Case(
        "jira_comment_image", JIRA_COMMENTS, JIRA_COMMENT,
        "the comment embeds `!http://evil.example/z.png!`",
        TRANSFORMED, "no image in MDR: a link to the address",
        payload={"body": "!http://evil.example/z.png!"},
        copy_has=("http://evil.example/z.png",),
        copy_lacks=HTML_ACTIVE,
    ),
    Case(
        "jira_comment_markdown_html", JIRA_COMMENTS, JIRA_COMMENT,
        "the comment holds raw HTML, a Markdown image and a Markdown javascript: link",
        TRANSFORMED, "no raw HTML, image or script link reaches MDR",
        payload={"body": "<img src=x> ![i](http://evil.example/i.png) [l](javascript:alert(1))"},
        copy_lacks=HTML_ACTIVE,
    ),
    Case(
        "jira_comment_control_characters", JIRA_COMMENTS, JIRA_COMMENT,
        "the comment holds NUL and BEL",
        TRANSFORMED, "NUL and BEL are removed",
        payload={"body": "a\x00b\x07c"},
        copy_has=("abc",),
        copy_lacks=("[\x00-\x08]",),
    ),
    Case(
        "jira_comment_max_length", JIRA_COMMENTS, JIRA_COMMENT,
        "the comment has 32,700 characters, about the most Jira stores",
        KEPT, "copied whole: MDR takes the full text",
        payload={"body": "z" * 32_700 + " END"},
        copy_has=("z" * 32_700, "END"),
    ),
    Case(
        "jira_comment_astral_bidi", JIRA_COMMENTS, JIRA_COMMENT,
        "the comment holds emoji and U+202E",
        KEPT, "kept whole",
        payload={"body": "\U0001f9a0 \u202eabc"},
        copy_has=("\U0001f9a0 \u202eabc",),
    ),
    # Jira attachments on one linked issue.
    Case(
        "jira_file_traversal", JIRA_FILES, JIRA_ATTACHMENT_NAME,
        "the name is `../../etc/passwd`",
        TRANSFORMED, "`passwd` in MDR; the caption keeps the original name",
        payload={"name": "../../etc/passwd"},
        copy_has=("passwd", "original name: ../../etc/passwd"),
    ),
    Case(
        "jira_file_device", JIRA_FILES, JIRA_ATTACHMENT_NAME,
        "the name is the Windows device `CON`",
        TRANSFORMED, "`_CON` in MDR",
        payload={"name": "CON"}, copy_has=("_CON",),
    ),
    Case(
        "jira_file_bidi_spoof", JIRA_FILES, JIRA_ATTACHMENT_NAME,
        "the name `report\\u202etxt.exe` shows as `reportexe.txt` but is an .exe",
        NOTICE, "the override is removed and the .exe filter keeps the file back: a notice in MDR names `reporttxt.exe`",
        payload={"name": "report\u202etxt.exe"},
        copy_has=("reporttxt.exe", "extension .exe"),
    ),
    Case(
        "jira_file_trailing_dot_space", JIRA_FILES, JIRA_ATTACHMENT_NAME,
        "the name is `notes. `",
        TRANSFORMED, "trimmed to `notes`; the caption keeps the original name",
        payload={"name": "notes. "}, copy_has=("notes", "original name: notes. "),
    ),
    Case(
        "jira_file_zero_bytes", JIRA_FILES, JIRA_ATTACHMENT_CONTENT,
        "the file is empty",
        KEPT, "copied as an empty file",
        payload={"name": "empty-jira.txt", "content": b""}, copy_has=("empty-jira.txt",),
    ),
    Case(
        "jira_file_over_limit", JIRA_FILES, JIRA_ATTACHMENT_CONTENT,
        "the file has 5,000 bytes, more than the mapping's limit of 1,000",
        NOTICE, "not downloaded: a notice in MDR names the file and the limit",
        payload={"name": "big-jira.bin", "size": 5000},
        copy_has=("big-jira.bin", "larger than the limit of 1000 bytes"),
    ),
    # Jira issues that request an MDR incident (`create_incidents` on).
    Case(
        "jira_issue_hosts_not_entries", JIRA_ISSUES, JIRA_ISSUE_FIELD,
        "the hosts field holds free text instead of `HOSTNAME:asset_id` entries",
        NOTICE, "no incident: one reply on the ticket names the entry and the expected form",
        payload={"hosts": "just some text"},
        copy_has=("just some text", "HOSTNAME:asset_id"),
    ),
    Case(
        "jira_issue_hosts_as_number", JIRA_ISSUES, JIRA_ISSUE_FIELD,
        "the hosts field holds the number 42 instead of text",
        NOTICE, "no incident: one reply on the ticket says the field has no affected hosts",
        payload={"hosts": 42},
        copy_has=("has no affected hosts",),
    ),
    Case(
        "jira_issue_hosts_injection", JIRA_ISSUES, JIRA_ISSUE_FIELD,
        "a host entry ends in a JQL or SQL fragment: `WS-01:0x1\" OR 1=1`",
        NOTICE, "no incident: one reply on the ticket names the entry as code",
        payload={"hosts": 'WS-01:0x1" OR 1=1'},
        copy_has=('WS-01:0x1" OR 1=1',),
    ),
    Case(
        "jira_issue_summary_control", JIRA_ISSUES, JIRA_ISSUE_FIELD,
        "the summary holds BEL and U+202E",
        TRANSFORMED, "BEL is removed and the bidi override kept, as in every text",
        payload={"fields": {"summary": "a\x07b\u202ec"}},
        copy_has=("ab\u202ec",),
        copy_lacks=("[\x00-\x08]",),
    ),
    Case(
        "jira_issue_summary_markup", JIRA_ISSUES, JIRA_ISSUE_FIELD,
        "the summary holds `<script>`, a `{html}` macro and a javascript: wiki link",
        KEPT, "sent as typed, because the MDR summary is plain text without markup; "
        "that the console shows it as text was not checked against the console",
        payload={"fields": {"summary": "<script>alert(1)</script> [x|javascript:alert(2)]"}},
        copy_has=("<script>alert(1)</script> [x|javascript:alert(2)]",),
    ),
    Case(
        "jira_issue_description_markup", JIRA_ISSUES, JIRA_ISSUE_FIELD,
        "the description holds an `<img onerror>` tag, a wiki image and a javascript: wiki link",
        TRANSFORMED, "the client description in MDR is Markdown with the tag escaped, the image as an autolink and no link",
        payload={"fields": {"description": "<img src=x onerror=alert(1)> !http://evil.example/a.png! [y|javascript:alert(3)]"}},
        copy_lacks=MARKDOWN_ACTIVE,
    ),
    Case(
        "jira_issue_priority_unknown", JIRA_ISSUES, JIRA_ISSUE_FIELD,
        "the priority is Lowest, which the mapping does not map back to MDR",
        TRANSFORMED, "the incident gets priority NORMAL",
        payload={"fields": {"priority": {"name": "Lowest"}}},
        copy_has=("priority=NORMAL",),
    ),
    # Whole API replies spoiled once by the simulators' fault layer.
    Case(
        "reply_history_objects_as_lists", REPLIES, MDR_REPLY,
        "an incidents/history reply has its inner objects turned into lists",
        RETRIED, "the page is unreadable: `sync.history.unreadable` names the problem and that cycle reads incidents/list instead",
        payload={"system": "mdr", "kind": "wrong_types", "path": "incidents/history", "mutation": "object_to_list"},
        reason_has=("entity must be an object",),
    ),
    Case(
        "reply_comments_cut_json", REPLIES, MDR_REPLY,
        "a comments/list reply is cut short, so its JSON does not parse",
        RETRIED, "the read is retried at once and the comment is copied once",
        payload={"system": "mdr", "kind": "malformed_json", "path": "comments/list"},
    ),
    Case(
        "reply_attachments_numbers_as_strings", REPLIES, MDR_REPLY,
        "an attachments/list reply has every number turned into a string",
        RETRIED, "the incident is parked with the attachment, the field and the string; the next try copies the file once",
        payload={"system": "mdr", "kind": "wrong_types", "path": "attachments/list", "mutation": "number_to_string"},
        reason_has=("file_size", "valid integer", "(got \""),
    ),
    Case(
        "reply_jira_comments_numbers_as_strings", REPLIES, JIRA_REPLY,
        "a Jira comment list reply has every number turned into a string",
        RETRIED, "read as usual, because Jira ids are strings already; the MDR comment is copied once",
        payload={"system": "jira", "kind": "wrong_types", "method": "GET", "path": "*comment*", "mutation": "number_to_string"},
    ),
)


def cases(group: str) -> list[Case]:
    """Return the cases of one group, in corpus order."""
    return [case for case in CASES if case.group == group]
