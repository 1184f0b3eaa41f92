"""The `{assets}` table: reading assets through the cache, rendering, and the engine end to end."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fixtures_mdr import MDR_CLIENT_ID
from fixtures_sync import SyncHarness

from mdr_connector.adapters.mdr.models import Asset, Incident, NetworkInterface
from mdr_connector.connector.assets import (
    UNAVAILABLE,
    AffectedHost,
    AssetDetails,
    AssetRow,
    affected_hosts,
    assets_wanted,
    render_table,
)
from mdr_connector.connector.errors import InvalidPayloadError, RejectedError, RemoteUnavailableError, TokenExpiredError
from mdr_connector.connector.i18n import language
from mdr_connector.connector.mappingfile import load_mapping
from mdr_connector.connector.retry import RetryPolicy, retry_read
from mdr_connector.connector.store import Store
from mdr_connector.connector.sync_common import SyncContext, SyncStats

DETAILS = "assets/details"
EDIT_ISSUE = "PUT /rest/api/2/issue/{issue}"
DESCRIPTION_WITH_ASSETS = "{description}\n\n**Assets:**\n\n{assets}\n"
LAST_SEEN = 1768219992478  # 2026-01-12 12:13 UTC


def make_asset(asset_id: str, **fields: Any) -> Asset:
    values: dict[str, Any] = {
        "asset_id": asset_id,
        "host_name": "WS-FIN-017",
        "os_version": "Windows 10 Enterprise 22H2",
        "installed_product_info": "Kaspersky Endpoint Security for Windows 12.6",
        "status": "OK",
        "isolation": False,
        "last_seen": LAST_SEEN,
        "network_interfaces": [NetworkInterface(ip="10.20.0.5")],
    }
    values.update(fields)
    return Asset(**values)


def make_incident(*hosts: str) -> Incident:
    return Incident(
        incident_id="inc-1",
        incident_number=1336650,
        summary="Suspicious PowerShell",
        priority="HIGH",
        status="Open",
        creation_time=LAST_SEEN,
        update_time=LAST_SEEN,
        affected_hosts=list(hosts),
    )


class FakeMdr:
    """get_asset from a dict; a value that is an exception is raised instead."""

    def __init__(self, assets: dict[str, Asset | Exception]) -> None:
        self.assets = assets
        self.calls: list[str] = []

    async def get_asset(self, asset_id: str) -> Asset:
        self.calls.append(asset_id)
        value = self.assets.get(asset_id)
        if value is None:
            raise RejectedError(f"MDR assets/details returned HTTP 404 (not found): asset {asset_id}", 404)
        if isinstance(value, Exception):
            raise value
        return value


@pytest.fixture
async def store(tmp_path: Path) -> Store:
    opened = await Store.open(f"sqlite+aiosqlite:///{tmp_path}/ledger.db")
    yield opened
    await opened.close()


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(timezone.utc)

    def __call__(self) -> datetime:
        return self.now


def make_context(store: Store, mdr: FakeMdr, clock: Clock, **asset_rules: Any) -> SyncContext:
    mapping = load_mapping("builtin:jira")
    mapping = mapping.model_copy(
        update={
            "description": DESCRIPTION_WITH_ASSETS,
            "assets": mapping.assets.model_copy(update=asset_rules),
        }
    )
    policy = RetryPolicy(attempts=2, base_seconds=0.001, max_seconds=0.01)
    return SyncContext(
        settings=SimpleNamespace(name="main"),  # type: ignore[arg-type]
        mapping=mapping,
        store=store,
        mdr=mdr,  # type: ignore[arg-type]
        tickets=None,  # type: ignore[arg-type]
        stats=SyncStats(),
        read=lambda call: retry_read(policy, call),
        clock=clock,
        spool_dir=Path("unused"),
    )


# Rendering


def test_table_shows_every_column() -> None:
    """A row shows host, all IPs (split at `|`), OS, product, status, isolation and last seen in UTC."""
    asset = make_asset(
        "0xa",
        isolation=True,
        status="CRITICAL",
        network_interfaces=[NetworkInterface(ip="10.0.0.1|10.0.0.2"), NetworkInterface(ip="fe80::1")],
    )

    table = render_table([AssetRow(AffectedHost("WS-FIN-017", "0xa"), asset)], [], 20)
    header, separator, row = table.splitlines()

    assert header == "| Host | IP addresses | OS | Product | Status | Isolated | Last seen |"
    assert separator == "|---|---|---|---|---|---|---|"
    assert row == (
        "| WS-FIN-017 | 10.0.0.1, 10.0.0.2, fe80::1 | Windows 10 Enterprise 22H2 "
        "| Kaspersky Endpoint Security for Windows 12.6 | CRITICAL | yes | 2026-01-12 12:13 UTC |"
    )


def test_table_in_russian() -> None:
    """Under Russian the header and the isolation value are Russian; MDR's own values stay as they are."""
    asset = make_asset("0xa", isolation=False, status="OK")

    with language("ru"):
        table = render_table([AssetRow(AffectedHost("WS-01", "0xa"), asset)], [], 20)
    header, separator, row = table.splitlines()

    assert header == "| Хост | IP-адреса | ОС | Продукт | Статус | Изолирован | Последняя активность |"
    assert separator == "|---|---|---|---|---|---|---|"
    assert "| OK | нет |" in row


def test_table_escapes_mdr_values() -> None:
    """Markdown, HTML, pipes and line breaks from MDR show as text and cannot add cells, links or tags."""
    asset = make_asset(
        "0xa",
        host_name="WS|01\n<script>x</script>",
        os_version="[click](javascript:alert(1))",
        installed_product_info="**bold** `code`",
    )

    row = render_table([AssetRow(AffectedHost("WS", "0xa"), asset)], [], 20).splitlines()[2]

    assert row.count(" | ") == 6
    assert "WS¦01 \\<script\\>x\\</script\\>" in row
    assert "\\[click\\]\\(javascript:alert\\(1\\)\\)" in row
    assert "\\*\\*bold\\*\\* \\`code\\`" in row


def test_table_cuts_long_values() -> None:
    """A cell longer than 200 characters is cut and ends with an ellipsis."""
    asset = make_asset("0xa", os_version="x" * 5000)

    row = render_table([AssetRow(AffectedHost("WS", "0xa"), asset)], [], 20).splitlines()[2]

    assert "x" * 199 + "…" in row
    assert "x" * 200 not in row


def test_unavailable_row_names_host_and_id() -> None:
    """An asset without details is shown by host name and asset id with the reason."""
    row = render_table([AssetRow(AffectedHost("DC-01", "0xdef"), None, UNAVAILABLE)], [], 20).splitlines()[2]

    assert row == "| DC-01 | details unavailable, asset 0xdef | - | - | - | - | - |"


def test_affected_hosts_parsing() -> None:
    """Items split at the first colon. A repeated asset id is kept once, and an item without an id keeps its name."""
    incident = make_incident("WS-1:0xa", "WS-1:0xa", "WS-2:0xb", "BARE-HOST")

    assert affected_hosts(incident) == [
        AffectedHost("WS-1", "0xa"),
        AffectedHost("WS-2", "0xb"),
        AffectedHost("BARE-HOST", ""),
    ]


def test_assets_wanted_follows_templates() -> None:
    """Assets are read only when enabled and a written template uses `{assets}`."""
    default = load_mapping("builtin:jira")
    with_assets = default.model_copy(update={"description": DESCRIPTION_WITH_ASSETS})
    disabled = with_assets.model_copy(update={"assets": with_assets.assets.model_copy(update={"enabled": False})})
    without = default.model_copy(update={"description": "{description}"})

    assert assets_wanted(with_assets)
    assert not assets_wanted(with_assets, frozenset({"description"}))
    assert not assets_wanted(disabled)
    assert not assets_wanted(without)


# Reading through the cache


async def test_cache_serves_second_read(store: Store) -> None:
    """Within cache_seconds the second render reads nothing from MDR."""
    mdr, clock = FakeMdr({"0xa": make_asset("0xa")}), Clock()
    details = AssetDetails(make_context(store, mdr, clock, cache_seconds=600))
    incident = make_incident("WS-FIN-017:0xa")

    first = await details.render(incident)
    clock.now += timedelta(seconds=300)
    second = await details.render(incident)

    assert mdr.calls == ["0xa"]
    assert first == second
    assert "10.20.0.5" in second


async def test_expired_cache_reads_again(store: Store) -> None:
    """After cache_seconds the asset is read from MDR again, and the new values show."""
    mdr, clock = FakeMdr({"0xa": make_asset("0xa")}), Clock()
    details = AssetDetails(make_context(store, mdr, clock, cache_seconds=600))
    incident = make_incident("WS-FIN-017:0xa")
    await details.render(incident)

    mdr.assets["0xa"] = make_asset("0xa", isolation=True)
    clock.now += timedelta(seconds=601)
    table = await details.render(incident)

    assert mdr.calls == ["0xa", "0xa"]
    assert "| yes |" in table


async def test_zero_cache_seconds_always_reads(store: Store) -> None:
    """cache_seconds 0 turns the cache off."""
    mdr, clock = FakeMdr({"0xa": make_asset("0xa")}), Clock()
    details = AssetDetails(make_context(store, mdr, clock, cache_seconds=0))
    incident = make_incident("WS-FIN-017:0xa")

    await details.render(incident)
    await details.render(incident)

    assert mdr.calls == ["0xa", "0xa"]
    assert await store.get_cached_assets("main", ["0xa"], fresh_after=clock.now - timedelta(days=1)) == {}


@pytest.mark.parametrize(
    "failure",
    [
        RejectedError("MDR assets/details returned HTTP 404 (not found)", 404),
        InvalidPayloadError("MDR asset 0xb is malformed: status: Input should be a valid string"),
        RemoteUnavailableError("MDR assets/details failed with HTTP 503"),
    ],
    ids=["not-found", "malformed", "unavailable"],
)
async def test_unreadable_asset_does_not_fail(store: Store, failure: Exception, caplog: pytest.LogCaptureFixture) -> None:
    """An asset MDR cannot return is shown as unavailable, logged, not cached, and the others still render."""
    mdr = FakeMdr({"0xa": make_asset("0xa"), "0xb": failure})
    details = AssetDetails(make_context(store, mdr, Clock()))

    table = await details.render(make_incident("WS-FIN-017:0xa", "DC-01:0xb"))

    assert "| WS-FIN-017 | 10.20.0.5 |" in table
    assert "| DC-01 | details unavailable, asset 0xb |" in table
    assert [record.asset_id for record in caplog.records if record.msg == "sync.asset.unavailable"] == ["0xb"]
    cached = await store.get_cached_assets("main", ["0xa", "0xb"], fresh_after=Clock().now - timedelta(days=1))
    assert set(cached) == {"0xa"}


async def test_fatal_error_is_raised(store: Store) -> None:
    """An expired MDR token is not hidden as an unavailable asset: it stops the connection."""
    mdr = FakeMdr({"0xa": TokenExpiredError("the MDR refresh token expired")})
    details = AssetDetails(make_context(store, mdr, Clock()))

    with pytest.raises(TokenExpiredError):
        await details.render(make_incident("WS-FIN-017:0xa"))


async def test_mismatched_asset_is_unavailable(store: Store) -> None:
    """A reply for another asset id is not shown as the requested asset."""
    mdr = FakeMdr({"0xa": make_asset("0xother")})
    details = AssetDetails(make_context(store, mdr, Clock()))

    table = await details.render(make_incident("WS-FIN-017:0xa"))

    assert "details unavailable, asset 0xa" in table


async def test_max_assets_lists_rest_by_name(store: Store) -> None:
    """Only max_assets assets are read; the other hosts follow the table by name."""
    mdr = FakeMdr({f"0x{index}": make_asset(f"0x{index}", host_name=f"WS-{index}") for index in range(4)})
    details = AssetDetails(make_context(store, mdr, Clock(), max_assets=2))

    table = await details.render(make_incident(*(f"WS-{index}:0x{index}" for index in range(4))))

    assert sorted(mdr.calls) == ["0x0", "0x1"]
    assert table.endswith("More affected hosts, details not read (the limit is 2): WS-2, WS-3")


async def test_ids_that_cannot_be_read(store: Store) -> None:
    """A host without an asset id, or with an id too long for MDR and the cache, is listed without a read."""
    mdr = FakeMdr({})
    details = AssetDetails(make_context(store, mdr, Clock()))

    table = await details.render(make_incident("BARE-HOST", "LONG:" + "a" * 500))

    assert mdr.calls == []
    assert "| BARE-HOST | no asset id |" in table
    assert "| LONG | details unavailable, asset " in table


async def test_stale_cache_row_is_read_again(store: Store) -> None:
    """A cache row that no longer parses as an asset counts as a miss."""
    mdr, clock = FakeMdr({"0xa": make_asset("0xa")}), Clock()
    await store.put_cached_asset("main", "0xa", '{"unexpected": true}')
    details = AssetDetails(make_context(store, mdr, clock))

    table = await details.render(make_incident("WS-FIN-017:0xa"))

    assert mdr.calls == ["0xa"]
    assert "10.20.0.5" in table


async def test_no_hosts_renders_dash(store: Store) -> None:
    details = AssetDetails(make_context(store, FakeMdr({}), Clock()))

    assert await details.render(make_incident()) == "-"


# End to end: MDR and Jira simulators


def seed_with_asset(harness: SyncHarness, host_name: str, **asset_fields: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    asset = harness.mdr_sim.add_asset(MDR_CLIENT_ID, host_name, **asset_fields)
    incident = harness.seed(affected_hosts=[f"{host_name}:{asset['asset_id']}"])
    return incident, asset


async def test_issue_shows_asset_table(harness: SyncHarness) -> None:
    """The default mapping puts the asset table on the new issue: IPs, OS, product, status, isolation."""
    incident, _ = seed_with_asset(
        harness,
        "WS-FIN-042",
        os_version="Windows 11 Pro 23H2",
        status="WARNING",
        isolation=True,
        network_interfaces=[{"ip": "10.20.0.7|10.20.0.8", "mac": "AA:BB:CC:DD:EE:FF"}, {"ip": "fe80::42"}],
    )

    await harness.cycles(1)

    description = harness.issue_for(incident["incident_id"]).fields["description"]
    assert "|| Host || IP addresses || OS || Product || Status || Isolated || Last seen ||" in description
    row = next(line for line in description.splitlines() if "WS" in line and "FIN" in line and "10.20" in line)
    assert "10.20.0.7, 10.20.0.8, fe80::42" in row
    assert "Windows 11 Pro 23H2" in row
    assert "Kaspersky Endpoint Security for Windows 12.6" in row
    assert "| WARNING |" in row
    assert "| yes |" in row
    assert "UTC" in row


async def test_cache_serves_second_incident(harness: SyncHarness) -> None:
    """A second incident on the same asset within cache_seconds makes no second assets/details call."""
    first, asset = seed_with_asset(harness, "WS-FIN-043")
    sync = await harness.cycles(1)
    assert harness.mdr_sim.call_counts[DETAILS] == 1

    harness.advance(600)
    second = harness.seed(affected_hosts=[f"WS-FIN-043:{asset['asset_id']}"])
    await harness.cycles(1, sync)

    assert harness.mdr_sim.call_counts[DETAILS] == 1
    assert "WS-FIN-043" in harness.issue_for(second["incident_id"]).fields["description"]
    assert harness.issue_for(first["incident_id"])


async def test_expired_cache_reads_again(harness: SyncHarness) -> None:
    """After cache_seconds the next incident on the asset reads it again and shows the new values."""
    harness.use_mapping(assets={"cache_seconds": 60})
    _, asset = seed_with_asset(harness, "WS-FIN-044")
    sync = await harness.cycles(1)

    harness.mdr_sim.add_asset(MDR_CLIENT_ID, "WS-FIN-044", asset_id=asset["asset_id"], isolation=True)
    harness.advance(61)
    second = harness.seed(affected_hosts=[f"WS-FIN-044:{asset['asset_id']}"])
    await harness.cycles(1, sync)

    assert harness.mdr_sim.call_counts[DETAILS] == 2
    row = next(line for line in harness.issue_for(second["incident_id"]).fields["description"].splitlines() if "FIN" in line and "| OK |" in line)
    assert "| yes |" in row


async def test_missing_asset_does_not_block(harness: SyncHarness) -> None:
    """An asset that MDR returns 404 for and a malformed one are marked unavailable, and the issue is still created."""
    harness.mdr_sim.create_client("another-client")
    foreign = harness.mdr_sim.add_asset("another-client", "FOREIGN-HOST")
    broken = harness.mdr_sim.add_asset(MDR_CLIENT_ID, "BROKEN-HOST", status=["not", "a", "string"])
    own = harness.mdr_sim.add_asset(MDR_CLIENT_ID, "OWN-HOST")
    incident = harness.seed(
        affected_hosts=[
            f"FOREIGN-HOST:{foreign['asset_id']}",
            f"BROKEN-HOST:{broken['asset_id']}",
            f"OWN-HOST:{own['asset_id']}",
        ]
    )

    sync = await harness.cycles(1)

    description = harness.issue_for(incident["incident_id"]).fields["description"]
    assert f"details unavailable, asset {foreign['asset_id']}" in description
    assert f"details unavailable, asset {broken['asset_id']}" in description
    assert "| OK |" in description
    assert sync.stats.failures == 0


async def test_asset_change_alone_writes_nothing(harness: SyncHarness) -> None:
    """A changed asset does not rewrite the issue by itself; the next incident change writes the fresh table."""
    harness.use_mapping(assets={"cache_seconds": 60})
    incident, asset = seed_with_asset(harness, "WS-FIN-045")
    incident_id = incident["incident_id"]
    sync = await harness.cycles(1)
    issue = harness.issue_for(incident_id)
    edits = harness.jira.sim.calls[EDIT_ISSUE]

    harness.mdr_sim.add_asset(MDR_CLIENT_ID, "WS-FIN-045", asset_id=asset["asset_id"], isolation=True)
    harness.advance(61)
    harness.jira.sim.add_comment(issue.key, "Analyst note that makes the issue change")
    await harness.cycles(2, sync)

    assert harness.jira.sim.calls[EDIT_ISSUE] == edits
    assert harness.mdr_sim.call_counts[DETAILS] == 1
    assert "| yes |" not in issue.fields["description"]

    harness.mdr_sim.update_incident(MDR_CLIENT_ID, incident_id, summary="Escalated: PowerShell on WS-FIN-045")
    await harness.cycles(1, sync)

    assert harness.jira.sim.calls[EDIT_ISSUE] == edits + 1
    assert "| yes |" in issue.fields["description"]


async def test_assets_off_reads_nothing(harness: SyncHarness) -> None:
    """With assets.enabled false, `{assets}` lists the hosts and no assets/details call is made."""
    harness.use_mapping(assets={"enabled": False})
    incident, asset = seed_with_asset(harness, "WS-FIN-046")

    await harness.cycles(1)

    description = harness.issue_for(incident["incident_id"]).fields["description"]
    assert harness.mdr_sim.call_counts[DETAILS] == 0
    assert asset["asset_id"] in description
    assert "IP addresses" not in description
