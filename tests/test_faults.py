"""The shared fault plan of the simulators: each switch fires on each simulator, and the client maps it to its error class."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fixtures_jira import MakeAdapter, StartJira
from fixtures_mdr import MDR_CLIENT_ID, MDR_CONNECTION_NAME
from fixtures_servicenow import CATEGORY, GROUP, MakeAdapter as MakeServiceNowAdapter, StartServiceNow

from mdr_connector.adapters.faults import FAULT_KINDS, FaultPlan, load_fault_file
from mdr_connector.adapters.mdr.client import MdrClient
from mdr_connector.adapters.mdr.simulator import API_PREFIX, MdrSimulator
from mdr_connector.connector.cli import main
from mdr_connector.connector.config import MdrSettings
from mdr_connector.connector.errors import (
    InvalidPayloadError,
    OutcomeUnknownError,
    RateLimitedError,
    RemoteUnavailableError,
)
from mdr_connector.connector.tickets import TicketAdapter, TicketDraft, TicketFields

INCIDENT_ID = "-MAfspsBq_r24TsN5-fault"
# A client timeout well below the injected hang, so the hang always outlasts it.
SHORT_TIMEOUT = 0.5
HANG_SECONDS = 3.0


# --- the plan itself -------------------------------------------------------------


def test_same_seed_fires_the_same_faults() -> None:
    """Two plans with one seed pick the same requests to fail, so a storm run can be repeated."""

    def firings(seed: int) -> list[bool]:
        plan = FaultPlan(seed)
        plan.add("server_error", probability=0.3)
        return [plan.pick(("server_error",), "GET", ("/x",)) is not None for _ in range(200)]

    assert firings(5) == firings(5)
    assert firings(5) != firings(6)
    assert 30 < sum(firings(5)) < 90


def test_count_limits_the_firings() -> None:
    """A rule with a count fires that many times and then never again."""
    plan = FaultPlan()
    plan.add("rate_limit", method="post", path="/rest/api/2/issue", count=2)

    picked = [plan.pick(("rate_limit",), "POST", ("/rest/api/2/issue",)) for _ in range(4)]

    assert [rule is not None for rule in picked] == [True, True, False, False]
    assert plan.pick(("rate_limit",), "GET", ("/rest/api/2/issue",)) is None


@pytest.mark.parametrize(
    "data, problem",
    [
        ({"rules": [{"kind": "teapot"}]}, "rules.0.kind"),
        ({"rules": [{"kind": "hang", "statuses": [500]}]}, "a hang rule takes no statuses"),
        ({"rules": [{"kind": "server_error", "statuses": [404]}]}, "statuses must be 5xx codes"),
        ({"rules": [{"kind": "rate_limit", "retry_after_seconds": "5"}]}, "retry_after_seconds"),
        ({"rules": [{"kind": "drop_after_commit", "probability": 1.5}]}, "probability"),
        ({"rules": [{"kind": "cut_download", "cut_fraction": 1}]}, "cut_fraction"),
        ({"rulez": []}, "rulez"),
        ({"service_time_zone": "Mars/Olympus"}, "unknown time zone"),
        ([], "plan"),
    ],
    ids=["unknown-kind", "option-of-other-kind", "status-not-5xx", "string-number", "probability", "fraction", "unknown-key", "zone", "not-a-mapping"],
)
def test_invalid_plan_changes_nothing(data: Any, problem: str) -> None:
    """An invalid plan raises ValueError naming the problem, and the rules in force stay."""
    plan = FaultPlan()
    plan.add("server_error")

    with pytest.raises(ValueError, match=problem):
        plan.configure(data)

    assert [rule.kind for rule in plan.rules] == ["server_error"]


def test_fault_file_is_safe_loaded(tmp_path: Path) -> None:
    """A YAML plan is read with safe_load: a Python object tag is an error, a plain plan loads."""
    hostile = tmp_path / "hostile.yaml"
    hostile.write_text("rules: !!python/object/new:os.system [echo owned]\n", encoding="utf-8")
    plain = tmp_path / "plain.yaml"
    plain.write_text("seed: 3\nrules:\n  - {kind: server_error, probability: 0.2}\n", encoding="utf-8")

    with pytest.raises(ValueError, match="hostile.yaml"):
        load_fault_file(hostile)
    settings = load_fault_file(plain)

    assert settings.seed == 3
    assert settings.rules[0].probability == 0.2


@pytest.mark.parametrize("system", ["mdr", "jira", "servicenow"])
def test_simulate_rejects_invalid_fault_file(system: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`simulate --faults` with an unknown fault kind fails before any simulator starts, naming the file and the key."""
    plan = tmp_path / "plan.yaml"
    plan.write_text("rules:\n  - {kind: teapot}\n", encoding="utf-8")

    code = main(["simulate", system, "--faults", str(plan)])

    error = capsys.readouterr().err
    assert code == 1
    assert f"the --faults file cannot be used: {plan}: invalid fault plan: rules.0.kind" in error


# --- MDR -------------------------------------------------------------------------


@pytest.fixture
async def short_mdr_client(mdr_url: str, mdr_sim: MdrSimulator, token_dir: Path) -> AsyncIterator[MdrClient]:
    """An MDR client with an activated token chain and a timeout shorter than the injected hang."""
    settings = MdrSettings(
        base_url=mdr_url,
        client_id=MDR_CLIENT_ID,
        connection_name=MDR_CONNECTION_NAME,
        token_dir=token_dir,
        timeout_seconds=SHORT_TIMEOUT,
    )
    async with MdrClient(settings) as client:
        await client.tokens.activate(mdr_sim.issue_console_token(MDR_CLIENT_ID))
        yield client


# (rule, API method the rule selects, call, expected error)
MdrCall = Callable[[MdrClient, str, Path], Awaitable[Any]]


async def _mdr_read(client: MdrClient, incident_id: str, folder: Path) -> Any:
    return await client.list_comments(incident_id)


async def _mdr_get(client: MdrClient, incident_id: str, folder: Path) -> Any:
    return await client.get_incident(incident_id)


async def _mdr_write(client: MdrClient, incident_id: str, folder: Path) -> Any:
    return await client.create_comment(incident_id, "Host isolated.")


async def _mdr_download(client: MdrClient, incident_id: str, folder: Path) -> Any:
    [attachment] = (await client.list_attachments(incident_id)).items
    return await client.download_attachment(attachment, folder / "evidence.bin")


# A Retry-After above the clients' longest pause (60 s), so they raise at once instead of waiting and sending again.
LONG_RETRY_AFTER = 120

MDR_CASES: dict[str, tuple[dict[str, Any], str, MdrCall, type[Exception]]] = {
    "429-seconds": (
        {"kind": "rate_limit", "retry_after_seconds": LONG_RETRY_AFTER, "count": None},
        "comments/list",
        _mdr_read,
        RateLimitedError,
    ),
    "429-http-date": (
        {"kind": "rate_limit", "retry_after_seconds": LONG_RETRY_AFTER, "retry_after_format": "http_date", "count": None},
        "comments/list",
        _mdr_read,
        RateLimitedError,
    ),
    "500-read": ({"kind": "server_error", "statuses": [500]}, "comments/list", _mdr_read, RemoteUnavailableError),
    "502-write": ({"kind": "server_error", "statuses": [502]}, "comments/create", _mdr_write, OutcomeUnknownError),
    "hang-read": ({"kind": "hang", "hang_seconds": HANG_SECONDS}, "comments/list", _mdr_read, RemoteUnavailableError),
    "drop-write": ({"kind": "drop_after_commit"}, "comments/create", _mdr_write, OutcomeUnknownError),
    "drop-read": ({"kind": "drop_after_commit"}, "comments/list", _mdr_read, RemoteUnavailableError),
    "malformed-read": ({"kind": "malformed_json"}, "comments/list", _mdr_read, RemoteUnavailableError),
    "malformed-write": ({"kind": "malformed_json"}, "comments/create", _mdr_write, OutcomeUnknownError),
    "number-as-string": ({"kind": "wrong_types"}, "incidents/details", _mdr_get, InvalidPayloadError),
    "cut-download": ({"kind": "cut_download"}, "attachments/download", _mdr_download, RemoteUnavailableError),
}


@pytest.mark.parametrize("rule, method, call, error", MDR_CASES.values(), ids=MDR_CASES.keys())
async def test_mdr_fault_maps_to_error_class(
    short_mdr_client: MdrClient,
    mdr_sim: MdrSimulator,
    tmp_path: Path,
    rule: dict[str, Any],
    method: str,
    call: MdrCall,
    error: type[Exception],
) -> None:
    """Each MDR fault fires once on the selected API method, and the client raises the error class of its recovery policy."""
    incident_id = mdr_sim.seed_incident(MDR_CLIENT_ID)["incident_id"]
    mdr_sim.add_attachment(MDR_CLIENT_ID, incident_id, "evidence.bin", size=4096)
    mdr_sim.faults.add(**{"count": 1, **rule}, method="POST", path=method)

    with pytest.raises(error) as raised:
        await call(short_mdr_client, incident_id, tmp_path)

    assert mdr_sim.faults.fired[rule["kind"]] >= 1
    if isinstance(raised.value, RateLimitedError):
        assert raised.value.retry_after == rule["retry_after_seconds"]


@pytest.mark.parametrize("mutation", ["number_to_string", "object_to_list"])
async def test_mdr_wrong_types_in_a_list_are_isolated(active_mdr_client: MdrClient, mdr_sim: MdrSimulator, mutation: str) -> None:
    """A list reply whose records have wrong types keeps them apart as malformed, and raises nothing."""
    incident_id = mdr_sim.seed_incident(MDR_CLIENT_ID)["incident_id"]
    mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "Host isolated.")
    mdr_sim.faults.add("wrong_types", mutation=mutation, path="comments/list", count=1)

    page = await active_mdr_client.list_comments(incident_id)

    assert mdr_sim.faults.fired["wrong_types"] == 1
    assert (len(page.items), len(page.malformed)) == (0, 1)


@pytest.mark.parametrize("retry_after_format, expected", [("seconds", "0"), ("http_date", None)])
async def test_mdr_rate_limit_headers(mdr_sim: MdrSimulator, mdr_url: str, retry_after_format: str, expected: str | None) -> None:
    """A 429 carries Retry-After as seconds (0 included) or as an HTTP date equal to the reply's Date, from the simulator clock."""
    mdr_sim.advance(3600)
    mdr_sim.faults.add("rate_limit", retry_after_format=retry_after_format)
    async with aiohttp.ClientSession() as session:
        reply = await session.post(f"{mdr_url}/{MDR_CLIENT_ID}/incidents/list", json={})

    replied_at = parsedate_to_datetime(reply.headers["Date"])
    assert reply.status == 429
    assert abs(replied_at.timestamp() - mdr_sim.now()) < 5
    assert reply.headers["Retry-After"] == (expected or reply.headers["Date"])


async def test_mdr_session_confirm_never_drops(mdr_sim: MdrSimulator, mdr_settings: MdrSettings) -> None:
    """A drop rule on every endpoint leaves session/confirm alone, so the token chain survives."""
    mdr_sim.faults.add("drop_after_commit")

    async with MdrClient(mdr_settings) as client:
        await client.tokens.activate(mdr_sim.issue_console_token(MDR_CLIENT_ID))

    assert mdr_sim.confirm_calls == 1
    assert mdr_sim.faults.fired["drop_after_commit"] == 0
    with pytest.raises(ValueError, match="session/confirm"):
        mdr_sim.drop_reply_after_commit("session/confirm")


async def test_mdr_index_lag(active_mdr_client: MdrClient, mdr_sim: MdrSimulator) -> None:
    """With an index lag, incidents/list shows a change only after the lag, still with its own update time."""
    incident_id = mdr_sim.seed_incident(MDR_CLIENT_ID)["incident_id"]
    mdr_sim.faults.configure({"index_lag_seconds": 60})
    changed = mdr_sim.update_incident(MDR_CLIENT_ID, incident_id, status="Closed")

    before = (await active_mdr_client.list_incidents()).items
    mdr_sim.advance(60)
    after = (await active_mdr_client.list_incidents()).items

    assert [incident.status for incident in before] != ["Closed"]
    assert [incident.status for incident in after] == ["Closed"]
    assert after[0].update_time == changed["update_time"]


async def test_mdr_faults_over_http(mdr_sim: MdrSimulator, mdr_url: str) -> None:
    """POST /_sim/faults sets the plan, GET shows it with its counts, DELETE ends it; a bad plan gets 400."""
    origin = mdr_url.removesuffix(API_PREFIX)
    plan = {"seed": 4, "rules": [{"kind": "server_error", "path": "incidents/*", "statuses": [503]}]}
    async with aiohttp.ClientSession() as session:
        set_reply = await session.post(f"{origin}/_sim/faults", json=plan)
        failed = await session.post(f"{mdr_url}/{MDR_CLIENT_ID}/incidents/list", json={})
        shown = await (await session.get(f"{origin}/_sim/faults")).json()
        bad = await session.post(f"{origin}/_sim/faults", json={"rules": [{"kind": "hang", "hang_seconds": -1}]})
        cleared = await (await session.delete(f"{origin}/_sim/faults")).json()

    assert set_reply.status == 200
    assert failed.status == 503
    assert shown["rules"][0]["path"] == "incidents/*"
    assert shown["fired"]["server_error"] == 1
    assert bad.status == 400
    assert cleared["rules"] == []
    assert cleared["fired"] == {kind: 0 for kind in FAULT_KINDS}


# --- Jira and ServiceNow ---------------------------------------------------------


@dataclass
class TicketSide:
    """One ticket simulator with an adapter on it, and what its calls are called in the fault plan."""

    system: str
    sim: Any
    url: str
    adapter: TicketAdapter
    read_path: str
    write_path: str
    download_path: str
    draft: Callable[[str], TicketDraft]

    def add_file(self, key: str) -> None:
        self.sim.add_attachment(key, "evidence.bin", b"x" * 4096)


def _jira_draft(incident_id: str) -> TicketDraft:
    fields = TicketFields(summary="[MDR-7] Suspicious PowerShell", description="Host ws-01.", priority="High", labels=())
    return TicketDraft(incident_id=incident_id, project="SEC", issue_type="Task", fields=fields)


def _servicenow_draft(incident_id: str) -> TicketDraft:
    fields = TicketFields(summary="Suspicious PowerShell", description="Host ws-01.", priority="1 - High", labels=())
    return TicketDraft(incident_id=incident_id, project=GROUP, issue_type=CATEGORY, fields=fields)


@pytest.fixture(params=["jira", "servicenow"])
async def ticket_side(
    request: pytest.FixtureRequest,
    start_jira: StartJira,
    make_adapter: MakeAdapter,
    start_servicenow: StartServiceNow,
    make_servicenow_adapter: MakeServiceNowAdapter,
) -> TicketSide:
    """Jira Cloud or ServiceNow with an opened adapter whose timeout is shorter than the injected hang."""
    if request.param == "jira":
        jira = await start_jira(deployment="cloud")
        adapter = await make_adapter(jira, timeout_seconds=SHORT_TIMEOUT)
        api = "/rest/api/2"
        return TicketSide(
            "jira", jira.sim, jira.url, adapter, f"{api}/search/jql", f"{api}/issue",
            "/media/file/{attachment}/binary", _jira_draft,
        )
    servicenow = await start_servicenow()
    adapter = await make_servicenow_adapter(servicenow, timeout_seconds=SHORT_TIMEOUT)
    table = "/api/now/*table/{table}"
    return TicketSide(
        "servicenow", servicenow.sim, servicenow.url, adapter, table, table,
        "/api/now/*attachment/{sys_id}/file", _servicenow_draft,
    )


TicketCall = Callable[[TicketSide, Path], Awaitable[Any]]


async def _ticket_read(side: TicketSide, folder: Path) -> Any:
    return await side.adapter.find_ticket(INCIDENT_ID)


async def _ticket_write(side: TicketSide, folder: Path) -> Any:
    return await side.adapter.create_ticket(side.draft(INCIDENT_ID))


async def _ticket_download(side: TicketSide, folder: Path) -> Any:
    ref = await side.adapter.create_ticket(side.draft(INCIDENT_ID))
    side.add_file(ref.key)
    [attachment] = await side.adapter.list_attachments(ref)
    return await side.adapter.download_attachment(attachment, folder / "evidence.bin")


TICKET_CASES: dict[str, tuple[dict[str, Any], str, TicketCall, type[Exception]]] = {
    "429-seconds": (
        {"kind": "rate_limit", "retry_after_seconds": LONG_RETRY_AFTER, "count": None},
        "read",
        _ticket_read,
        RateLimitedError,
    ),
    "429-http-date": (
        {"kind": "rate_limit", "retry_after_seconds": LONG_RETRY_AFTER, "retry_after_format": "http_date", "count": None},
        "read",
        _ticket_read,
        RateLimitedError,
    ),
    "500-read": ({"kind": "server_error", "statuses": [500]}, "read", _ticket_read, RemoteUnavailableError),
    "504-write": ({"kind": "server_error", "statuses": [504]}, "write", _ticket_write, OutcomeUnknownError),
    "hang-read": ({"kind": "hang", "hang_seconds": HANG_SECONDS}, "read", _ticket_read, RemoteUnavailableError),
    "drop-write": ({"kind": "drop_after_commit"}, "write", _ticket_write, OutcomeUnknownError),
    "malformed-read": ({"kind": "malformed_json"}, "read", _ticket_read, RemoteUnavailableError),
    "malformed-write": ({"kind": "malformed_json"}, "write", _ticket_write, OutcomeUnknownError),
    "list-for-object": ({"kind": "wrong_types", "mutation": "object_to_list"}, "read", _ticket_read, InvalidPayloadError),
    "cut-download": ({"kind": "cut_download"}, "download", _ticket_download, RemoteUnavailableError),
}


@pytest.mark.parametrize("case", TICKET_CASES)
async def test_ticket_fault_maps_to_error_class(ticket_side: TicketSide, tmp_path: Path, case: str) -> None:
    """Each Jira and ServiceNow fault fires once on the selected endpoint, and the adapter raises the error class of its recovery policy."""
    rule, target, call, error = TICKET_CASES[case]
    if target == "read":
        # Search reads a created ticket, so there is something to spoil.
        await side_create(ticket_side)
    method = "POST" if target == "write" else "*"
    path = {"read": ticket_side.read_path, "write": ticket_side.write_path, "download": ticket_side.download_path}[target]
    ticket_side.sim.faults.add(**{"count": 1, **rule}, method=method, path=path)

    with pytest.raises(error) as raised:
        await call(ticket_side, tmp_path)

    assert ticket_side.sim.faults.fired[rule["kind"]] >= 1
    if isinstance(raised.value, RateLimitedError):
        assert raised.value.retry_after == rule["retry_after_seconds"]


async def side_create(side: TicketSide) -> None:
    await side.adapter.create_ticket(side.draft(INCIDENT_ID))


async def test_ticket_index_lag(ticket_side: TicketSide) -> None:
    """With an index lag, a change search finds a new ticket only after the lag, as Cloud search and a lagging list do."""
    since = datetime.now(timezone.utc) - timedelta(minutes=5)
    ticket_side.sim.faults.configure({"index_lag_seconds": 60})
    ref = await ticket_side.adapter.create_ticket(ticket_side.draft(INCIDENT_ID))
    # Cloud search reads recently written issues in their current state; a fresh adapter has no such memory.
    if ticket_side.system == "jira":
        ticket_side.adapter._recent_writes.clear()  # noqa: SLF001

    before = await ticket_side.adapter.changed_tickets(since)
    ticket_side.sim.advance(60)
    after = await ticket_side.adapter.changed_tickets(since)

    assert before == []
    assert [change.ref.id for change in after] == [ref.id]


@pytest.mark.parametrize("zone", ["America/Los_Angeles", "Asia/Tokyo"], ids=["west", "east"])
async def test_account_time_zone_switch(ticket_side: TicketSide, zone: str) -> None:
    """The plan's service_time_zone moves the connector's account, and a change search still finds a person's edit."""
    ref = await ticket_side.adapter.create_ticket(ticket_side.draft(INCIDENT_ID))
    if ticket_side.system == "jira":
        ticket_side.adapter._recent_writes.clear()  # noqa: SLF001
    ticket_side.sim.advance(600)
    since = datetime.now(timezone.utc) + timedelta(seconds=300)

    async with aiohttp.ClientSession() as session:
        reply = await session.post(f"{ticket_side.url}/_sim/faults", json={"service_time_zone": zone})
        shown = await reply.json()
    ticket_side.sim.advance(120)
    if ticket_side.system == "jira":
        ticket_side.sim.edit_as_human(ref.key, summary="Checked by a person")
    else:
        ticket_side.sim.update_incident(ref.key, {"short_description": "Checked by a person"})
    found = await ticket_side.adapter.changed_tickets(since)

    assert shown["service_time_zone"] == zone
    assert ticket_side.sim.service.time_zone == zone
    assert [change.ref.id for change in found] == [ref.id]


async def test_ticket_faults_over_http(ticket_side: TicketSide) -> None:
    """POST /_sim/faults sets a 503 storm on every endpoint, GET counts it, DELETE ends it."""
    plan = {"rules": [{"kind": "server_error", "statuses": [503]}]}
    async with aiohttp.ClientSession() as session:
        await session.post(f"{ticket_side.url}/_sim/faults", json=plan)
        with pytest.raises(RemoteUnavailableError):
            await ticket_side.adapter.find_ticket(INCIDENT_ID)
        shown = await (await session.get(f"{ticket_side.url}/_sim/faults")).json()
        bad = await session.post(f"{ticket_side.url}/_sim/faults", json={"seed": "x"})
        await session.delete(f"{ticket_side.url}/_sim/faults")
    found = await ticket_side.adapter.find_ticket(INCIDENT_ID)

    assert shown["fired"]["server_error"] >= 1
    assert bad.status == 400
    assert found is None
    assert json.dumps(ticket_side.sim.faults.to_json()["rules"]) == "[]"
