"""Hostile input against the parked commands, the fault plan, the Markdown fast path and the rate gate.

Tests marked xfail(strict=True) show a defect that exists today; each one
starts to pass, and so fails the suite, once the product code is fixed.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pypandoc
import pytest
import requests
import yaml
from jira.exceptions import JIRAError
from test_cli_parked import cli, parking_config  # noqa: F401 - fixture used by name
from test_cli import activated_config, jira  # noqa: F401 - fixtures used by name

from mdr_connector.adapters.faults import load_fault_file
from mdr_connector.adapters.jira.errors import map_error
from mdr_connector.adapters.mdr.simulator import API_PREFIX, MdrSimulator
from mdr_connector.connector import markup
from mdr_connector.connector.errors import RateLimitedError
from mdr_connector.connector.http import parse_retry_after
from mdr_connector.connector.retry import MIN_PAUSE_SECONDS, RateGate, parked_next_try
from mdr_connector.connector.runner import FailureStreak, run_cycle_until_stopped

DAY_SECONDS = 86_400.0


# --- Markdown fast path -------------------------------------------------------

# GitHub Markdown without `[` and `<`, so `_has_no_tree_targets` lets it skip the tree step.
NO_BRACKET_TEXTS = [
    "www.example.com",
    "user@example.com",
    "mailto:user@example.com",
    "xmpp:user@example.com",
    "javascript:alert(1)",
    "JAVASCRIPT:alert(1)",
    "data:text/html,x",
    "vbscript:msgbox(1)",
    "file:///etc/passwd",
    "sftp://example.com/x",
    "&lt;script&gt;alert(1)&lt;/script&gt;",
    "&#60;img src=x onerror=alert(1)&#62;",
    "&#x3c;a href=javascript:x&#x3e;",
    "&#91;x&#93;(javascript:alert(1))",
    "\uff3bx\uff3d(javascript:alert(1))",
    "\u2039script\u203a alert(1)",
    "\ufe64script\ufe65",
    "$\\href{javascript:alert(1)}{x}$",
    "```{=html}\nalert(1)\n```",
    "`alert(1)`{=html}",
    "---\ntitle: x\n---\nbody",
    ":smile: x^1^ ~~y~~",
    "|a|b|\n|-|-|\n|www.example.com|x|",
    "text\twww.example.com",
    "> ! NOTE\n> quoted",
]


def _unsafe_nodes(text: str) -> list[str]:
    """Return the images, raw nodes and non-http(s)/mailto links that pandoc's gfm reader finds in `text`."""
    document = json.loads(
        subprocess.run(
            [pypandoc.get_pandoc_path(), "--from", "gfm", "--to", "json", "--sandbox"],
            input=text.encode("utf-8"),
            capture_output=True,
            check=True,
            timeout=30,
        ).stdout
    )
    found: list[str] = []

    def visit(node: Any) -> None:
        if isinstance(node, list):
            for child in node:
                visit(child)
            return
        if not isinstance(node, dict):
            return
        kind = node.get("t")
        if kind in {"Image", "RawInline", "RawBlock"}:
            found.append(kind)
        if kind == "Link":
            target = node["c"][2][0]
            scheme = target.split(":", 1)[0].lower() if ":" in target else ""
            if scheme not in markup.SAFE_URL_SCHEMES:
                found.append(f"Link to {target}")
        for child in node.values():
            visit(child)

    visit(document["blocks"])
    return found


@pytest.mark.parametrize("text", NO_BRACKET_TEXTS)
def test_fast_path_text_has_no_unsafe_nodes(text: str) -> None:
    """Text that skips the tree step gives pandoc's gfm reader no image, raw node or script link."""
    assert "[" not in text
    assert "<" not in text

    assert _unsafe_nodes(text) == []


def test_tree_path_shows_ftp_link_as_text() -> None:
    """With a `[` in the text the tree step runs and shows an ftp:// link as text."""
    converted = markup.markdown_to_jira("see ftp://example.com/payload.exe \\[")

    assert "[ftp://" not in converted
    assert "ftp://example.com/payload.exe" in converted


def test_markdown_to_jira_keeps_ftp_as_text() -> None:
    """Markdown to Jira shows a bare ftp:// URL as text, with or without a `[` elsewhere in the text."""
    converted = markup.markdown_to_jira("ftp://example.com/payload.exe")

    assert "[ftp://" not in converted


# --- Retry-After and the rate gate --------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["\u00b2", "\u00b9\u2070"],
    ids=["superscript-two", "superscript-ten"],
)
def test_retry_after_superscript_digit_is_invalid(value: str) -> None:
    """A Retry-After of superscript digits is invalid and parses to None."""
    assert parse_retry_after(value, None) is None


def test_jira_429_latin1_superscript_maps_to_rate_limit() -> None:
    """A Jira 429 whose Retry-After is the byte 0xB2, which requests decodes as `²`, maps to RateLimitedError."""
    response = requests.Response()
    response.status_code = 429
    response.headers["Retry-After"] = "\u00b2"
    error = JIRAError(status_code=429, text="slow down", response=response)

    mapped = map_error(error, "open", opening=True)

    assert isinstance(mapped, RateLimitedError)


def test_retry_after_arabic_indic_digit_is_invalid() -> None:
    """A Retry-After of Arabic-Indic digits is not delay-seconds, which are ASCII digits only."""
    assert parse_retry_after("\u0663", None) is None


def test_retry_after_huge_integer_is_finite() -> None:
    """A Retry-After of 400 digits gives a finite delay or None, never infinity."""
    seconds = parse_retry_after("9" * 400, None)

    assert seconds is None or math.isfinite(seconds)


@pytest.mark.parametrize("retry_after", [1e12, 1e30, math.inf], ids=["1e12", "1e30", "inf"])
def test_parked_next_try_survives_huge_retry_after(retry_after: float) -> None:
    """A parked item's next try is a valid time even when the reply's Retry-After ends past year 9999."""
    now = datetime(2026, 12, 5, tzinfo=timezone.utc)
    error = RateLimitedError("rate limited", retry_after=retry_after, status=429)

    next_try = parked_next_try(now, 1, 60, 3600, error)

    assert next_try >= now


class _FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


async def test_gate_zero_retry_after_does_not_spin() -> None:
    """A server that always replies 429 with Retry-After 0 gets `attempts` calls, MIN_PAUSE_SECONDS apart."""
    clock = _FakeClock()
    gate = RateGate("test", clock=clock, sleep=clock.sleep)
    calls = 0

    async def always_limited() -> None:
        nonlocal calls
        calls += 1
        raise RateLimitedError("limited", retry_after=0.0, status=429)

    with pytest.raises(RateLimitedError):
        await gate.send(always_limited)

    assert calls == gate.attempts
    assert all(seconds >= MIN_PAUSE_SECONDS for seconds in clock.sleeps)
    assert len(clock.sleeps) == gate.attempts - 1


async def test_gate_pause_capped_at_a_day() -> None:
    """One 429 with Retry-After of about 3 years does not close the gate for longer than a day."""
    clock = _FakeClock()
    gate = RateGate("test", clock=clock, sleep=clock.sleep)

    async def limited_once() -> None:
        raise RateLimitedError("limited", retry_after=99_999_999.0, status=429)

    with pytest.raises(RateLimitedError):
        await gate.send(limited_once)

    assert gate.remaining() <= DAY_SECONDS


async def test_run_delay_after_huge_retry_after_is_bounded() -> None:
    """After a cycle fails with a 429 of Retry-After 99,999,999 s, `run` waits at most a day before the next cycle."""

    async def failing_cycle() -> None:
        raise RateLimitedError("limited", retry_after=99_999_999.0, status=429)

    sync = SimpleNamespace(
        name="main",
        settings=SimpleNamespace(sync=SimpleNamespace(interval_seconds=10)),
        run_cycle=failing_cycle,
    )

    delay = await run_cycle_until_stopped(sync, asyncio.Event(), FailureStreak("main"))

    assert delay <= DAY_SECONDS


# --- Fault plan files and /_sim/faults ----------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        b"rules: !!python/object/apply:os.system ['true']\n",
        b"seed: 1\n\xff\xfe rules: []\n",
        b"rules:\n  - kind: rate_limit\n    bogus: 1\n",
        b"rules:\n  - kind: server_error\n    probability: -1\n",
        b"rules:\n  - kind: server_error\n    probability: .nan\n",
        b"- 1\n- 2\n",
    ],
    ids=["python-tag", "not-utf8", "unknown-key", "negative-probability", "nan-probability", "top-level-list"],
)
def test_fault_file_rejects_hostile_yaml(tmp_path: Path, content: bytes) -> None:
    """A hostile fault file raises ValueError and runs no code."""
    path = tmp_path / "faults.yaml"
    path.write_bytes(content)

    with pytest.raises(ValueError):
        load_fault_file(path)


def test_fault_file_rejects_deep_nesting(tmp_path: Path) -> None:
    """A fault file nested 100,000 levels deep raises ValueError that names the file."""
    path = tmp_path / "faults.yaml"
    path.write_text("rules: " + "[" * 100_000 + "]" * 100_000 + "\n")

    with pytest.raises(ValueError, match="faults.yaml"):
        load_fault_file(path)


def test_fault_file_not_utf8_names_the_file(tmp_path: Path) -> None:
    """A fault file that is not UTF-8 raises ValueError that names the file."""
    path = tmp_path / "faults.yaml"
    path.write_bytes(b"seed: 1\n\xff\n")

    with pytest.raises(ValueError, match="faults.yaml"):
        load_fault_file(path)


def test_fault_file_rejects_hang_of_years(tmp_path: Path) -> None:
    """A hang of 1e300 s is rejected, because a simulator with such a request in flight never stops on SIGTERM."""
    path = tmp_path / "faults.yaml"
    path.write_text("rules:\n  - kind: hang\n    hang_seconds: 1.0e+300\n")

    with pytest.raises(ValueError, match="hang_seconds"):
        load_fault_file(path)


async def test_sim_faults_deep_json_gets_400(mdr_sim: MdrSimulator, mdr_url: str) -> None:
    """A fault plan nested 100,000 levels deep gets 400 from POST /_sim/faults, as any invalid plan does."""
    origin = mdr_url.removesuffix(API_PREFIX)
    body = "[" * 100_000 + "]" * 100_000

    async with aiohttp.ClientSession() as session:
        reply = await session.post(f"{origin}/_sim/faults", data=body, headers={"Content-Type": "application/json"})

    assert reply.status == 400


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        "null",
        "[]",
        '{"rules": {"kind": "hang"}}',
        '{"rules": [{"kind": "rate_limit", "retry_after_seconds": 1e400}]}',
        '{"rules": [{"kind": "rate_limit", "retry_after_seconds": NaN}]}',
        '{"rules": [{"kind": "server_error", "probability": Infinity}]}',
        '{"rules": [{"kind": "rate_limit", "retry_after_seconds": "5"}]}',
        '{"service_time_zone": "../../etc/localtime"}',
    ],
)
async def test_sim_faults_hostile_json_gets_400(mdr_sim: MdrSimulator, mdr_url: str, body: str) -> None:
    """Hostile JSON to POST /_sim/faults gets 400 and leaves the plan empty."""
    origin = mdr_url.removesuffix(API_PREFIX)

    async with aiohttp.ClientSession() as session:
        reply = await session.post(f"{origin}/_sim/faults", data=body, headers={"Content-Type": "application/json"})
        plan = await (await session.get(f"{origin}/_sim/faults")).json()

    assert reply.status == 400
    assert plan["rules"] == []


# --- parked commands ----------------------------------------------------------


async def test_parked_retry_non_utf8_id_is_named(parking_config: Path) -> None:  # noqa: F811 - fixture
    """An item id with bytes that are not UTF-8 gets an error that names the id, not an unexpected one."""
    code, _, err = await cli(parking_config, "parked", "retry", "--", "bad-\udcff")

    assert code == 2
    assert "bad-" in err
    assert "unexpected" not in err


async def test_parked_retry_all_missing_database_fails(parking_config: Path) -> None:  # noqa: F811 - fixture
    """`parked retry --all` on a ledger that does not exist fails like `parked list` and creates no database."""
    document = yaml.safe_load(parking_config.read_text())
    missing = parking_config.parent / "missing-data"
    document["data_dir"] = str(missing)
    parking_config.write_text(yaml.safe_dump(document))

    list_code, _, _ = await cli(parking_config, "parked", "list")
    retry_code, _, _ = await cli(parking_config, "parked", "retry", "--all")

    assert list_code == 1
    assert retry_code == 1
    assert not any(missing.glob("*.db"))
