"""Rate limits and retries: the RateGate of each client against the simulators' 429 faults, on a fake clock.

Waits are recorded by a fake `sleep` and never timed. The MDR, Jira and
ServiceNow clients meet real 429 replies from their simulators. Redmine
runs only as a real server, which has no rate limit to switch on, so its
client is driven through aioresponses.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import aiohttp
import pytest
from aioresponses import aioresponses
from fixtures_jira import MakeAdapter, RunningJira, StartJira, jira_settings
from fixtures_mdr import MDR_CLIENT_ID
from fixtures_servicenow import MakeAdapter as MakeServiceNowAdapter
from fixtures_servicenow import RunningServiceNow
from fixtures_sync import SyncHarness

from mdr_connector.adapters.jira.adapter import JiraTicketAdapter
from mdr_connector.adapters.mdr.client import MdrClient
from mdr_connector.adapters.mdr.simulator import MdrSimulator
from mdr_connector.adapters.redmine.client import RedmineClient
from mdr_connector.connector.config import RedmineSettings
from mdr_connector.connector.errors import OutcomeUnknownError, RateLimitedError
from mdr_connector.connector.retry import MAX_PAUSE_SECONDS, RateGate, parked_next_try
from mdr_connector.connector.service import open_connection
from mdr_connector.connector.tickets import TicketDraft, TicketFields

REDMINE_URL = "https://redmine.example"
REDMINE_ISSUES = f"{REDMINE_URL}/issues.json"
# Jira Cloud searches with POST /rest/api/2/search/jql.
JIRA_SEARCH = {"method": "POST", "path": "*/search/jql"}


class FakeClock:
    """Monotonic seconds that move only when the code under test sleeps; each sleep is recorded."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.waits: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


class ManualClock:
    """Monotonic seconds that move only when the test calls `advance`; a sleeper wakes once its time has come."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.waits: list[float] = []
        self.sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sleepers.append((self.now + seconds, wake))
        await wake

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for sleeper in [sleeper for sleeper in self.sleepers if sleeper[0] <= self.now]:
            self.sleepers.remove(sleeper)
            sleeper[1].set_result(None)


async def until(condition: Callable[[], bool]) -> None:
    """Let other tasks run until `condition` holds; fail after 500 rounds, whatever the machine's speed."""
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition never held")


def gate(system: str, clock: FakeClock | ManualClock, **options: Any) -> RateGate:
    return RateGate(system, clock=clock, sleep=clock.sleep, **options)


def jira_draft(incident_id: str = "inc-429") -> TicketDraft:
    return TicketDraft(
        incident_id=incident_id,
        project="SEC",
        issue_type="Task",
        fields=TicketFields(summary="[MDR-7] Rate limited", description="text", priority="High", labels=()),
        metadata={"incident_number": 7},
    )


def rate_limit_twice(plan: Any, **selector: str) -> None:
    """Reply 429 to the next two selected requests, with Retry-After 0 and then Retry-After 5."""
    plan.add("rate_limit", count=1, retry_after_seconds=0, **selector)
    plan.add("rate_limit", count=1, retry_after_seconds=5, **selector)


# Retry-After 0 and then 5: at least 1 s, then at least 5 s, then success


async def test_mdr_waits_zero_then_five(active_mdr_client: MdrClient, mdr_sim: MdrSimulator) -> None:
    """MDR: a 429 with Retry-After 0, then one with 5, waits 1 s and 5 s and returns the third reply."""
    clock = FakeClock()
    active_mdr_client.rate_gate = gate("mdr", clock)
    mdr_sim.seed_incident(MDR_CLIENT_ID)
    rate_limit_twice(mdr_sim.faults, path="incidents/count")

    count = await active_mdr_client.count_incidents()

    assert count == 1
    assert clock.waits == [1.0, 5.0]
    assert mdr_sim.faults.fired["rate_limit"] == 2


async def test_jira_create_waits_zero_then_five(jira_cloud: RunningJira, make_adapter: MakeAdapter) -> None:
    """Jira: a create met by two 429s is sent again after 1 s and 5 s and makes exactly one issue."""
    adapter = await make_adapter(jira_cloud)
    clock = FakeClock()
    adapter.rate_gate = gate("jira", clock)
    rate_limit_twice(jira_cloud.sim.faults, method="POST", path="/rest/api/2/issue")

    ref = await adapter.create_ticket(jira_draft())

    assert clock.waits == [1.0, 5.0]
    assert jira_cloud.sim.faults.fired["rate_limit"] == 2
    assert [issue.key for issue in jira_cloud.sim.issues.values()] == [ref.key]


async def test_servicenow_waits_zero_then_five(
    servicenow: RunningServiceNow, make_servicenow_adapter: MakeServiceNowAdapter
) -> None:
    """ServiceNow: a read met by two 429s waits 1 s and 5 s, then returns its result."""
    adapter = await make_servicenow_adapter(servicenow)
    clock = FakeClock()
    adapter.client.rate_gate = gate("servicenow", clock)
    rate_limit_twice(servicenow.sim.faults, method="GET")

    found = await adapter.find_ticket("inc-none")

    assert found is None
    assert clock.waits == [1.0, 5.0]
    assert servicenow.sim.faults.fired["rate_limit"] == 2


async def test_redmine_waits_zero_then_five(monkeypatch: pytest.MonkeyPatch) -> None:
    """Redmine: a read met by two 429s waits 1 s and 5 s, then returns the third reply."""
    clock = FakeClock()
    client = await open_redmine(monkeypatch, gate("redmine", clock))
    try:
        with aioresponses() as mock:
            mock.get(REDMINE_ISSUES, status=429, headers={"Retry-After": "0"})
            mock.get(REDMINE_ISSUES, status=429, headers={"Retry-After": "5"})
            mock.get(REDMINE_ISSUES, payload={"issues": []})

            reply = await client.get("/issues.json")
    finally:
        await client.close()

    assert reply == {"issues": []}
    assert clock.waits == [1.0, 5.0]


async def open_redmine(monkeypatch: pytest.MonkeyPatch, rate_gate: RateGate) -> RedmineClient:
    monkeypatch.setenv("MDR_TEST_REDMINE_KEY", "k" * 40)
    settings = RedmineSettings(system="redmine", url=REDMINE_URL, api_key={"env": "MDR_TEST_REDMINE_KEY"})
    client = RedmineClient(settings, rate_gate=rate_gate)
    await client.open()
    return client


# Retry-After values other than plain seconds


@pytest.mark.parametrize("system", ["jira", "servicenow"])
async def test_http_date_read_against_date_header(
    system: str,
    jira_cloud: RunningJira,
    make_adapter: MakeAdapter,
    servicenow: RunningServiceNow,
    make_servicenow_adapter: MakeServiceNowAdapter,
) -> None:
    """A Retry-After HTTP date counts from the reply's Date, so a server clock 3 days ahead still gives 7 s."""
    clock = FakeClock()
    if system == "jira":
        adapter: Any = await make_adapter(jira_cloud)
        adapter.rate_gate = gate("jira", clock)
        sim: Any = jira_cloud.sim
        selector = JIRA_SEARCH
    else:
        adapter = await make_servicenow_adapter(servicenow)
        adapter.client.rate_gate = gate("servicenow", clock)
        sim = servicenow.sim
        selector = {"method": "GET"}
    sim.advance(3 * 86400)
    sim.faults.add("rate_limit", count=1, retry_after_seconds=7, retry_after_format="http_date", **selector)

    assert await adapter.find_ticket("inc-none") is None

    assert clock.waits == [7.0]


RETRY_AFTER_VALUES = {
    "past date": ("Wed, 21 Oct 2015 07:28:00 GMT", 1.0, 1.0),
    "garbled": ("soon", 1.0, 1.0),
    "negative": ("-5", 1.0, 1.0),
    "empty": ("", 1.0, 1.0),
    "seconds": ("3", 3.0, 3.0),
}


@pytest.mark.parametrize(("value", "low", "high"), RETRY_AFTER_VALUES.values(), ids=RETRY_AFTER_VALUES.keys())
async def test_unusable_retry_after_backs_off(
    monkeypatch: pytest.MonkeyPatch, value: str, low: float, high: float
) -> None:
    """A Retry-After in the past waits the 1 s floor, and a garbled one the first backoff step, also 1 s."""
    clock = FakeClock()
    client = await open_redmine(monkeypatch, gate("redmine", clock))
    try:
        with aioresponses() as mock:
            mock.get(REDMINE_ISSUES, status=429, headers={"Retry-After": value})
            mock.get(REDMINE_ISSUES, payload={"issues": []})
            await client.get("/issues.json")
    finally:
        await client.close()

    [wait] = clock.waits
    assert low <= wait <= high


async def test_backoff_grows_without_retry_after(monkeypatch: pytest.MonkeyPatch) -> None:
    """Repeated 429s without Retry-After wait jittered doubling steps, each at least 1 s, until the attempts end."""
    clock = FakeClock()
    client = await open_redmine(monkeypatch, gate("redmine", clock, attempts=4))
    try:
        with aioresponses() as mock:
            mock.get(REDMINE_ISSUES, status=429, repeat=True)
            with pytest.raises(RateLimitedError) as caught:
                await client.get("/issues.json")
            sent = sum(len(calls) for calls in mock.requests.values())
    finally:
        await client.close()

    assert sent == 4
    assert len(clock.waits) == 3
    for step, wait in enumerate(clock.waits, start=1):
        assert 1.0 <= wait <= 2 ** (step - 1)
    assert caught.value.retry_after is not None
    assert caught.value.retry_after >= 1.0


# One pause for the whole account


async def test_second_call_waits_for_first_pause(active_mdr_client: MdrClient, mdr_sim: MdrSimulator) -> None:
    """A call started while another call's 429 pauses MDR waits out that pause before it sends anything."""
    clock = ManualClock()
    active_mdr_client.rate_gate = gate("mdr", clock)
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    mdr_sim.faults.add("rate_limit", path="incidents/count", count=1, retry_after_seconds=5)

    first = asyncio.create_task(active_mdr_client.count_incidents())
    await until(lambda: len(clock.sleepers) == 1)
    second = asyncio.create_task(active_mdr_client.list_comments(incident["incident_id"]))
    await until(lambda: len(clock.sleepers) == 2)

    assert clock.waits == [5.0, 5.0]
    assert mdr_sim.call_counts["comments/list"] == 0

    clock.advance(5)
    assert await first == 1
    assert (await second).items == []
    assert mdr_sim.call_counts["comments/list"] == 1


async def test_pause_is_per_client(active_mdr_client: MdrClient, jira_cloud: RunningJira, make_adapter: MakeAdapter) -> None:
    """A 429 from Jira pauses the Jira adapter only; the MDR client keeps sending."""
    adapter = await make_adapter(jira_cloud)
    jira_clock, mdr_clock = FakeClock(), FakeClock()
    adapter.rate_gate = gate("jira", jira_clock)
    active_mdr_client.rate_gate = gate("mdr", mdr_clock)
    jira_cloud.sim.faults.add("rate_limit", count=1, retry_after_seconds=30, **JIRA_SEARCH)

    await adapter.find_ticket("inc-none")
    await active_mdr_client.count_incidents()

    assert jira_clock.waits == [30.0]
    assert mdr_clock.waits == []


def test_pause_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """The pause is logged when it starts, with the system and the seconds, and not again while it runs."""
    clock = FakeClock()
    rate_gate = gate("jira", clock)

    with caplog.at_level("WARNING", logger="mdr_connector.connector.retry"):
        rate_gate.pause(5)
        rate_gate.pause(8)
        clock.now += 9
        rate_gate.pause(2)

    events = [record for record in caplog.records if record.getMessage() == "http.rate_limited.paused"]
    assert [(record.system, record.seconds) for record in events] == [("jira", 5), ("jira", 2)]
    assert rate_gate.remaining() == 2


# A pause longer than the cap parks the item


async def test_long_pause_parks_items(harness: SyncHarness, start_jira: StartJira, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Retry-After of an hour parks each incident until then, without sleeping; a connection to another Jira syncs on."""
    first = harness.seed()["incident_id"]
    second = harness.seed()["incident_id"]
    limited = await harness.engine()
    clock = FakeClock()
    limited.tickets.rate_gate = gate("jira", clock)
    harness.jira.sim.faults.add("rate_limit", method="POST", path="/rest/api/2/issue", retry_after_seconds=3600)

    other_jira = await start_jira(deployment="cloud")
    other = await open_other_connection(harness, other_jira, monkeypatch)

    started = harness.now()
    # The ticket-side change search meets the paused gate too, so the cycle ends with the
    # rate limit, and the runner waits out the stated time before the next cycle.
    with pytest.raises(RateLimitedError) as caught:
        await limited.run_cycle()
    await other.run_cycle()

    parked = {item.item_id: item for item in await harness.store.list_parked("main")}
    assert set(parked) == {first, second}
    for item in parked.values():
        assert item.next_try_at >= started + timedelta(seconds=3600 - 1)
        assert item.next_try_at <= harness.now() + timedelta(seconds=3600 + 1)
    assert clock.waits == []
    assert caught.value.retry_after is not None
    assert caught.value.retry_after > MAX_PAUSE_SECONDS
    assert harness.issues_for(first) == []
    assert harness.jira.sim.faults.fired["rate_limit"] <= 2

    assert await harness.store.list_parked("second") == []
    other_labels = [issue.fields.get("labels", []) for issue in other_jira.sim.issues.values()]
    assert sorted(label for labels in other_labels for label in labels if label in (f"mdr-{first}", f"mdr-{second}")) == sorted(
        [f"mdr-{first}", f"mdr-{second}"]
    )


async def open_other_connection(harness: SyncHarness, jira: RunningJira, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Open a second connection, named `second`, from the same MDR client to another Jira site."""
    connection = harness.connection.model_copy(
        update={"name": "second", "ticket": jira_settings(jira, monkeypatch, search_delay_seconds=30)}
    )
    settings = harness.settings.model_copy(update={"connections": [harness.connection, connection]})
    sync = await harness.stack.enter_async_context(open_connection(settings, connection, harness.store))
    sync.clock = harness.now
    return sync


async def test_gate_raises_at_once_beyond_cap() -> None:
    """While a pause longer than the cap runs, every call raises RateLimitedError with the time left and sends nothing."""
    clock = FakeClock()
    rate_gate = gate("servicenow", clock)
    rate_gate.pause(MAX_PAUSE_SECONDS + 600)
    clock.now += 100
    sent: list[str] = []

    async def call() -> str:
        sent.append("sent")
        return "done"

    with pytest.raises(RateLimitedError) as caught:
        await rate_gate.send(call)

    assert sent == []
    assert clock.waits == []
    assert caught.value.retry_after == MAX_PAUSE_SECONDS + 500
    assert caught.value.status is None


# Writes: sent again only after a 429


WRITE_REPLIES = {
    "429 then created": ({"status": 429, "headers": {"Retry-After": "2"}}, None, 2),
    "503 with Retry-After": ({"status": 503, "headers": {"Retry-After": "2"}}, RateLimitedError, 1),
    "500": ({"status": 500}, OutcomeUnknownError, 1),
    "connection dropped": ({"exception": aiohttp.ServerDisconnectedError()}, OutcomeUnknownError, 1),
    "timeout": ({"exception": TimeoutError()}, OutcomeUnknownError, 1),
}


@pytest.mark.parametrize(("first_reply", "error", "sends"), WRITE_REPLIES.values(), ids=WRITE_REPLIES.keys())
async def test_write_resent_only_after_429(
    monkeypatch: pytest.MonkeyPatch, first_reply: dict[str, Any], error: type[Exception] | None, sends: int
) -> None:
    """A write is sent again only after a 429, which was not applied; any unknown outcome goes up unsent."""
    clock = FakeClock()
    client = await open_redmine(monkeypatch, gate("redmine", clock))
    try:
        with aioresponses() as mock:
            mock.post(REDMINE_ISSUES, **first_reply)
            mock.post(REDMINE_ISSUES, status=201, payload={"issue": {"id": 1}})
            if error is None:
                reply = await client.send("POST", "/issues.json", {"issue": {}})
                assert reply == {"issue": {"id": 1}}
            else:
                with pytest.raises(error):
                    await client.send("POST", "/issues.json", {"issue": {}})
            sent = sum(len(calls) for calls in mock.requests.values())
    finally:
        await client.close()

    assert sent == sends


async def test_jira_503_create_not_resent(jira_cloud: RunningJira, make_adapter: MakeAdapter) -> None:
    """A Jira create that met a 5xx is OutcomeUnknownError after one send, so the engine looks it up first."""
    adapter: JiraTicketAdapter = await make_adapter(jira_cloud)
    clock = FakeClock()
    adapter.rate_gate = gate("jira", clock)
    jira_cloud.sim.faults.add("server_error", method="POST", path="/rest/api/2/issue", count=1, statuses=[503])

    with pytest.raises(OutcomeUnknownError):
        await adapter.create_ticket(jira_draft())

    assert jira_cloud.sim.faults.fired["server_error"] == 1
    assert jira_cloud.sim.calls["POST /rest/api/2/issue"] == 1
    assert clock.waits == []


async def test_mdr_comment_resent_after_429(active_mdr_client: MdrClient, mdr_sim: MdrSimulator) -> None:
    """An MDR comment met by a 429 is sent again after the pause and stored once."""
    clock = FakeClock()
    active_mdr_client.rate_gate = gate("mdr", clock)
    incident_id = mdr_sim.seed_incident(MDR_CLIENT_ID)["incident_id"]
    mdr_sim.faults.add("rate_limit", path="comments/create", count=1, retry_after_seconds=2)

    await active_mdr_client.create_comment(incident_id, "one copy")

    assert clock.waits == [2.0]
    texts = [str(comment.get("text")) for comment in mdr_sim.comments(MDR_CLIENT_ID, incident_id)]
    assert sum("one copy" in text for text in texts) == 1


def test_parked_next_try_waits_retry_after() -> None:
    now = datetime(2026, 12, 5, tzinfo=timezone.utc)
    limited = RateLimitedError("rate limited", retry_after=7200)

    next_try = parked_next_try(now, 1, 60, 3600, limited)

    assert next_try == now + timedelta(seconds=7200)


def test_parked_next_try_backoff_without_limit() -> None:
    now = datetime(2026, 12, 5, tzinfo=timezone.utc)

    next_try = parked_next_try(now, 1, 60, 3600, OutcomeUnknownError("no reply"))

    assert now + timedelta(seconds=30) <= next_try <= now + timedelta(seconds=60)

