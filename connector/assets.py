"""The `{assets}` placeholder: details of an incident's affected assets, read from MDR through a cache.

Each item of an incident's `affected_hosts` is `HOSTNAME:asset_id`. The
details of up to `mapping.assets.max_assets` of them are read with
`assets/details`, or taken from the ledger's asset cache while they are
younger than `mapping.assets.cache_seconds`, and rendered as a Markdown
table. The remaining hosts are listed by name after the table.

An asset MDR cannot return (404, a malformed record, or a failure that
outlasts the read retries) is shown by its host name and id with "details
unavailable" and logged. It never stops the ticket from being written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from pydantic import ValidationError

from mdr_connector.adapters.mdr.models import MAX_EPOCH_MS, MAX_ID_LENGTH, Asset, Incident
from mdr_connector.connector.errors import ConnectionFatalError, ConnectorError
from mdr_connector.connector.i18n import N_, _
from mdr_connector.connector.mapping import escape_markdown, format_ms, template_placeholders
from mdr_connector.connector.mappingfile import Mapping
from mdr_connector.connector.sync_common import SyncContext, gather_or_cancel

log = logging.getLogger(__name__)

ASSETS_PLACEHOLDER = "assets"
UNAVAILABLE = N_("details unavailable")
NO_ASSET_ID = N_("no asset id")
# A cell longer than this is cut, so a broken or hostile record cannot fill
# the description. Host names, OS versions and product names are far shorter.
MAX_CELL_CHARACTERS = 200
TABLE_COLUMNS = (
    N_("Host"), N_("IP addresses"), N_("OS"), N_("Product"), N_("Status"), N_("Isolated"), N_("Last seen"),
)


def table_header() -> str:
    """Return the table's header and separator lines in the current language."""
    names = " | ".join(_(name) for name in TABLE_COLUMNS)
    return f"| {names} |\n|{'---|' * len(TABLE_COLUMNS)}"


@dataclass(frozen=True)
class AffectedHost:
    """One `affected_hosts` item: the host name and the asset id, "" when the item has none."""

    host_name: str
    asset_id: str


@dataclass(frozen=True)
class AssetRow:
    """A host of the table, with its details, or None and the reason they are missing."""

    host: AffectedHost
    asset: Asset | None
    problem: str = ""


def affected_hosts(incident: Incident) -> list[AffectedHost]:
    """Parse `affected_hosts`, keeping the first item of each asset id (or host name, for items without an id)."""
    hosts: dict[str, AffectedHost] = {}
    for entry in incident.affected_hosts:
        host_name, _, asset_id = entry.partition(":")
        host = AffectedHost(host_name.strip(), asset_id.strip())
        hosts.setdefault(host.asset_id or f"host:{host.host_name}", host)
    return list(hosts.values())


def assets_wanted(mapping: Mapping, skip: frozenset[str] = frozenset()) -> bool:
    """Tell whether asset details are needed: they are enabled and the template of a field not in `skip` uses `{assets}`."""
    if not mapping.assets.enabled:
        return False
    templates = {
        "summary": [mapping.summary],
        "description": [mapping.description],
        "labels": [*mapping.labels, *(label for route in mapping.routes for label in route.labels)],
    }
    return any(
        ASSETS_PLACEHOLDER in template_placeholders(template)
        for name, field_templates in templates.items()
        if name not in skip
        for template in field_templates
    )


class AssetDetails:
    """Reads the affected assets of incidents and renders the `{assets}` table."""

    def __init__(self, context: SyncContext) -> None:
        self.context = context
        self.rules = context.mapping.assets

    async def render(self, incident: Incident) -> str:
        """Read the incident's assets and return the Markdown table, or "-" when it has no affected hosts."""
        hosts = affected_hosts(incident)
        if not hosts:
            return "-"

        detailed, rest = hosts[: self.rules.max_assets], hosts[self.rules.max_assets :]
        rows = await self.read_rows(incident, detailed)
        return render_table(rows, rest, self.rules.max_assets)

    async def read_rows(self, incident: Incident, hosts: list[AffectedHost]) -> list[AssetRow]:
        """Return a row for each host, with details from the cache or from MDR."""
        readable = [host.asset_id for host in hosts if usable_asset_id(host.asset_id)]
        # NOTE: incidents reconciled at the same time may each read a shared
        # asset, because the cache is filled only when a read returns.
        cached = await self._cached(readable)
        missing = [asset_id for asset_id in readable if asset_id not in cached]
        fetched = await gather_or_cancel(*(self._fetch(incident, asset_id) for asset_id in missing))
        found: dict[str, Asset | str] = {**cached, **dict(zip(missing, fetched, strict=True))}

        rows = []
        for host in hosts:
            if not host.asset_id:
                rows.append(AssetRow(host, None, _(NO_ASSET_ID)))
                continue
            result = found.get(host.asset_id)
            if result is None:
                result = self._unavailable(incident, host.asset_id[:MAX_ID_LENGTH], "the asset id is too long")
            if isinstance(result, Asset):
                rows.append(AssetRow(host, result))
            else:
                rows.append(AssetRow(host, None, result))
        return rows

    async def _cached(self, asset_ids: list[str]) -> dict[str, Asset]:
        if self.rules.cache_seconds == 0 or not asset_ids:
            return {}
        fresh_after = self.context.clock() - timedelta(seconds=self.rules.cache_seconds)
        stored = await self.context.store.get_cached_assets(self.context.name, asset_ids, fresh_after=fresh_after)

        assets = {}
        for asset_id, data in stored.items():
            try:
                asset = Asset.model_validate_json(data)
            except ValidationError:
                # A row written by another version of the connector: read it again.
                continue
            assets[asset_id] = asset
        return assets

    async def _fetch(self, incident: Incident, asset_id: str) -> Asset | str:
        """Read one asset from MDR and cache it, or return UNAVAILABLE and log why when MDR cannot return it."""
        try:
            asset = await self.context.read(lambda: self.context.mdr.get_asset(asset_id))
        except ConnectionFatalError:
            raise
        except ConnectorError as err:
            return self._unavailable(incident, asset_id, f"{type(err).__name__}: {err}")

        if asset.asset_id != asset_id:
            return self._unavailable(incident, asset_id, f"MDR returned asset {asset.asset_id!r} instead")
        if self.rules.cache_seconds > 0:
            await self.context.store.put_cached_asset(self.context.name, asset_id, asset.model_dump_json())
        return asset

    def _unavailable(self, incident: Incident, asset_id: str, error: str) -> str:
        log.warning(
            "sync.asset.unavailable",
            extra={
                "connection": self.context.name,
                "incident_id": incident.incident_id,
                "asset_id": asset_id,
                "error": error,
            },
        )
        return _(UNAVAILABLE)


def usable_asset_id(asset_id: str) -> bool:
    """Tell whether an id from `affected_hosts` can be sent to MDR and kept in the cache's id column."""
    return 0 < len(asset_id) <= MAX_ID_LENGTH


def render_table(rows: list[AssetRow], rest: list[AffectedHost], limit: int) -> str:
    """Render rows as a Markdown table. Hosts beyond the limit follow on one line, by name."""
    lines = [table_header(), *(render_row(row) for row in rows)] if rows else []
    if rest:
        names = ", ".join(cell(host.host_name or host.asset_id) for host in rest)
        lines.append("\n" + _("More affected hosts, details not read (the limit is {limit}): {names}").format(
            limit=limit, names=names))
    return "\n".join(lines).strip()


def render_row(row: AssetRow) -> str:
    """Render one table row. Every value from MDR is escaped, so it shows as plain text."""
    asset = row.asset
    if asset is None:
        where = (
            _("{problem}, asset {asset_id}").format(problem=row.problem, asset_id=row.host.asset_id)
            if row.host.asset_id
            else row.problem
        )
        values = [row.host.host_name, where, "", "", "", "", ""]
    else:
        values = [
            asset.host_name or row.host.host_name,
            ", ".join(dict.fromkeys(ip.strip() for ip in asset.ip_addresses() if ip.strip())),
            asset.os_version,
            asset.installed_product_info,
            asset.status,
            _("yes") if asset.isolation else _("no"),
            format_last_seen(asset.last_seen),
        ]
    return "| " + " | ".join(cell(value) for value in values) + " |"


def cell(value: str) -> str:
    """Return a table cell showing `value` literally: one line, at most MAX_CELL_CHARACTERS, "-" when empty."""
    # NOTE: a `|` escaped for Markdown still reaches Jira's table markup
    # unescaped (pandoc 3.9's Jira writer), where it would split the cell,
    # so it is shown as the broken bar `¦`.
    text = " ".join(value.split()).replace("|", "¦")
    if len(text) > MAX_CELL_CHARACTERS:
        text = text[: MAX_CELL_CHARACTERS - 1] + "…"
    return escape_markdown(text) or "-"


def format_last_seen(epoch_ms: int | None) -> str:
    if epoch_ms is None or not 0 <= epoch_ms <= MAX_EPOCH_MS:
        return ""
    return format_ms(epoch_ms)
