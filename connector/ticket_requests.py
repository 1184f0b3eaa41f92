"""Tickets that ask for an MDR incident: each one creates an incident (`incidents/create`) and is linked to it.

Opt-in through `mapping.create_incidents`. Every cycle, tickets of the
mapping's project that carry the configured label or issue type and were
created since the request cursor are read. A ticket already linked is
skipped. Any other ticket needs a summary and affected hosts
(`HOSTNAME:asset_id` entries in the mapped field). A ticket without them
gets one reply comment saying what to fill, and it is read again in later
cycles. A complete request creates the incident, is stamped with the
incident's correlation marker, and is linked, so from then on it syncs
like any other ticket.

The create follows the engine's write protocol. The intent is recorded
first, with the ticket as the ledger scope because no incident id exists
yet. The incident's `client_description` ends in a marker naming the
connection and the ticket, and a create whose outcome is unknown is
looked up by that marker among the incidents created since the intent
before it is sent again.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from mdr_connector.adapters.mdr.models import PRIORITIES, Incident
from mdr_connector.connector import markup
from mdr_connector.connector.errors import (
    ConfigError,
    ConnectionFatalError,
    ConnectorError,
    OutcomeUnknownError,
    RejectedError,
    RemoteUnavailableError,
)
from mdr_connector.connector.i18n import _
from mdr_connector.connector.mapping import CONNECTOR_LABEL, code_span, comment_visibility, escape_markdown
from mdr_connector.connector.retry import parked_next_try
from mdr_connector.connector.store import DONE, LINKED, PENDING, TICKET_TO_MDR, SyncedItem, utc_now
from mdr_connector.connector.sync_common import SyncContext
from mdr_connector.connector.tickets import (
    NOTICE_ORIGIN,
    CommentDraft,
    SyncMarker,
    TicketQuery,
    TicketRef,
    TicketState,
    system_title,
)

log = logging.getLogger(__name__)

REQUEST_CURSOR = "ticket_requests"
# Ledger kinds: the create intent of a ticket's incident, and the replies on the ticket.
REQUEST = "incident_request"
REQUEST_NOTE = "incident_request_note"
# The parked-item kind of a request whose create failed.
PARKED_REQUEST = "incident_request"
HOST_ENTRY = re.compile(r"^([^\s:]+):(\S+)$")
HTML_TAG = re.compile(r"<[^>]*>")
# incidents/list page size of the lookup after a lost create reply.
LOOKUP_PAGE_SIZE = 100
DEFAULT_PRIORITY = "NORMAL"


def request_scope(ref: TicketRef) -> str:
    """Return the ledger scope of a ticket's request rows, in place of the incident id that does not exist yet.

    Every MDR incident id seen so far is letters and digits only, so a
    scope with a colon does not collide with one.
    """
    return f"ticket:{ref.id}"


@dataclass(frozen=True)
class IncidentRequest:
    """The incident a ticket requests, read from its fields."""

    summary: str
    description: str
    priority: str
    hosts: tuple[str, ...]
    tenant_id: str

    @property
    def digest(self) -> str:
        """A digest of the request, which changes whenever the ticket's request changes."""
        encoded = json.dumps(
            [self.summary, self.description, self.priority, list(self.hosts), self.tenant_id], ensure_ascii=False
        )
        return hashlib.sha256(encoded.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class RequestProblem:
    """The reason a ticket cannot become an incident yet, shown to people in a reply comment."""

    message: str
    digest: str


class TicketIncidentRequests:
    """Creates MDR incidents for the tickets that ask for one, and links each ticket to its incident."""

    label = "incident requests"

    def __init__(self, context: SyncContext) -> None:
        self.context = context
        self.name = context.name
        self.rules = context.mapping.create_incidents
        if self.rules.enabled:
            check_request_rules(context)

    async def run(self) -> None:
        """Handle the requests created since the cursor; move the cursor only when none is left waiting."""
        if not self.rules.enabled:
            return

        started = self.context.clock()
        since = await self._since(started)
        query = TicketQuery(
            project=self.context.mapping.project, label=self.rules.label, issue_type=self.rules.issue_type
        )
        # NOTE: `find_tickets` matches on creation time, so a label added to a
        # ticket created before the cursor's window is not seen as a request.
        found = await self.context.read(lambda: self.context.tickets.find_tickets(query, since))
        refs = list({ref.id: ref for ref in found}.values())

        links = await self.context.store.get_links_by_ticket_ids(self.name, [ref.id for ref in refs])
        unlinked = [ref for ref in refs if ref.id not in links]
        parked = await self.context.store.parked_item_ids(
            self.name, PARKED_REQUEST, [ref.id for ref in unlinked], not_before=self.context.clock()
        )

        waiting = len(parked)
        for ref in unlinked:
            if ref.id in parked:
                continue
            if not await self._handle_guarded(ref):
                waiting += 1

        if waiting:
            log.info("sync.request.waiting", extra={"connection": self.name, "waiting": waiting})
            return
        await self.context.store.set_cursor(self.name, REQUEST_CURSOR, started.isoformat())

    async def _since(self, now: datetime) -> datetime:
        """Return the start of the search: the cursor minus an overlap for clock skew and search delay.

        The cursor is this machine's time at the start of the last cycle
        that left no request waiting, because `find_tickets` returns no
        creation times to take a server watermark from.
        """
        stored = await self.context.store.get_cursor(self.name, REQUEST_CURSOR)
        if stored is None:
            # Requests are read from when the setting is first used.
            stored = now.isoformat()
            await self.context.store.set_cursor(self.name, REQUEST_CURSOR, stored)
        overlap = max(self.context.settings.sync.ticket_overlap_seconds, self.context.tickets.search_delay_seconds())
        return datetime.fromisoformat(stored) - timedelta(seconds=overlap)

    async def _handle_guarded(self, ref: TicketRef) -> bool:
        """Handle one request; park it on failure so the others go on. Return True once it needs nothing more."""
        try:
            done = await self.handle(ref)
        except ConnectionFatalError:
            raise
        except ConnectorError as err:
            await self._park(ref, err)
            return False

        await self.context.store.unpark(self.name, PARKED_REQUEST, ref.id)
        return done

    async def handle(self, ref: TicketRef) -> bool:
        """Create the incident a ticket requests, or resume an earlier attempt, and link the ticket.

        Returns False while the ticket waits for a person to change it.
        """
        intent = await self._intent(ref)
        incident: Incident | None = None
        if intent is not None and intent.state == DONE and intent.target_id:
            # The incident exists and only the link is missing (a crash after the create).
            incident_id = intent.target_id
            incident = await self.context.read(lambda: self.context.mdr.get_incident(incident_id))
            return await self.link(ref, incident)

        if intent is not None and intent.state == PENDING:
            incident = await self.find_created(ref, intent.attempt_started_at)
            if incident is not None:
                await self._finish_intent(ref, incident, intent.source_version, "sync.request.create_found")
        if incident is None:
            incident = await self.create(ref)
        if incident is None:
            return False
        return await self.link(ref, incident)

    async def create(self, ref: TicketRef) -> Incident | None:
        """Read the request from the ticket and create its incident; None when the ticket must change first."""
        request = await self.read_request(ref)
        if isinstance(request, RequestProblem):
            await self.reply_once(ref, request.digest, request.message)
            return None
        if await self._replied(ref, request.digest):
            # MDR rejected this same request before, and the reply requested an edit.
            return None

        # Taken before the intent is stored, so the lookup window starts no later than the create.
        started = utc_now()
        await self.context.store.start_item(self.name, request_scope(ref), REQUEST, TICKET_TO_MDR, ref.id)
        try:
            incident = await self.context.mdr.create_incident(
                summary=request.summary,
                client_description=self._client_description(ref, request.description),
                affected_hosts=request.hosts,
                priority=request.priority,
                tenant_id=request.tenant_id,
            )
        except RejectedError as err:
            log.warning(
                "sync.request.rejected",
                extra={"connection": self.name, "ticket_key": ref.key, "error": str(err)},
            )
            # Nothing was created: an empty target closes the intent, so no lookup runs for it.
            await self.context.store.finish_item(
                self.name, request_scope(ref), REQUEST, TICKET_TO_MDR, ref.id, "", source_version=request.digest
            )
            await self.reply_once(
                ref,
                request.digest,
                # MDR's message can quote the ticket's own values, so it is shown as text.
                _(
                    "MDR rejected the incident this ticket requests: {error}. "
                    "Edit the ticket to send the request again."
                ).format(error=escape_markdown(str(err))),
            )
            return None
        except OutcomeUnknownError:
            # Looked up at once: were it left to the next cycle, the MDR change
            # search could see the new incident first and make a ticket for it.
            incident = await self.find_created(ref, started)
            if incident is None:
                raise
            await self._finish_intent(ref, incident, request.digest, "sync.request.create_found")
            return incident

        await self._finish_intent(ref, incident, request.digest, "sync.request.incident_created")
        return incident

    async def read_request(self, ref: TicketRef) -> IncidentRequest | RequestProblem:
        """Read summary, description, priority and hosts from the ticket; return a problem when one is missing."""
        hosts_field = self.rules.hosts_field
        assert hosts_field is not None
        state = await self.context.read(
            lambda: self.context.tickets.get_state(ref, ["summary", "description", "priority", hosts_field])
        )
        # The summary goes to MDR without conversion, so control characters are removed here.
        summary = markup.clean_text(text_value(state, "summary"))
        hosts, invalid = parse_hosts(state.values.get(hosts_field))
        request = IncidentRequest(
            summary=summary,
            description=text_value(state, "description"),
            priority=self._mdr_priority(text_value(state, "priority"), ref),
            hosts=tuple(hosts),
            tenant_id=self.rules.tenant_id,
        )

        withdraw = self._withdraw_hint()
        if invalid:
            listed = ", ".join(code_span(entry) for entry in invalid)
            return RequestProblem(
                _(
                    "mdr-connector cannot create an MDR incident for this ticket: these entries of field {field} "
                    "are not `HOSTNAME:asset_id`: {entries}. Correct them, one host per line; {withdraw}"
                ).format(field=code_span(hosts_field), entries=listed, withdraw=withdraw),
                hashlib.sha256(f"{request.digest}\n{listed}".encode("utf-8")).hexdigest()[:16],
            )
        if not hosts:
            return RequestProblem(
                _(
                    "mdr-connector cannot create an MDR incident for this ticket yet: field {field} has no affected "
                    "hosts. Fill it with one `HOSTNAME:asset_id` per line (the asset id is shown in the MDR console); "
                    "{withdraw}"
                ).format(field=code_span(hosts_field), withdraw=withdraw),
                request.digest,
            )
        if not summary:
            return RequestProblem(
                _(
                    "mdr-connector cannot create an MDR incident for this ticket: its summary is empty. "
                    "Fill it in; {withdraw}"
                ).format(withdraw=withdraw),
                request.digest,
            )
        return request

    async def find_created(self, ref: TicketRef, since: datetime) -> Incident | None:
        """Look up an incident created for this ticket at or after `since`, by the marker in its description.

        NOTE: this finds the incident only once `incidents/list` shows it.
        How soon MDR lists a new incident is not documented, and the
        simulator lists it at once. An incident that shows up later than the
        next attempt is created a second time.
        """
        margin = timedelta(seconds=self.context.settings.sync.mdr_overlap_seconds)
        floor = max(int((since - margin).timestamp() * 1000), 0)
        pattern = self._marker_pattern(ref)
        page_number = 1
        while True:
            page = await self.context.read(
                lambda: self.context.mdr.list_incidents(
                    min_creation_time=floor,
                    page=page_number,
                    page_size=LOOKUP_PAGE_SIZE,
                    sort="creation_time:asc",
                )
            )
            for incident in page.items:
                if pattern.search(visible_text(incident.client_description)):
                    return incident
            if page.raw_count < LOOKUP_PAGE_SIZE:
                return None
            if page_number >= self.context.settings.sync.max_pages_per_cycle:
                # Creating again without a finished lookup could duplicate the incident.
                raise RemoteUnavailableError(
                    f"the lookup of the incident created for ticket {ref.key} read {page_number} pages of "
                    "incidents/list without reaching the end; it is tried again in a later cycle"
                )
            page_number += 1

    async def link(self, ref: TicketRef, incident: Incident) -> bool:
        """Stamp the ticket with the incident's correlation marker, then record the link.

        The stamp goes first because it can be repeated: after a crash
        between the two steps, the next cycle stamps again and links.
        """
        incident_id = incident.incident_id
        existing = await self.context.store.get_link(self.name, incident_id)
        if existing is not None and existing.state == LINKED and existing.ticket_id != ref.id:
            # Incidents carrying this connection's request marker are linked
            # to their ticket, so this happens only when the incident was
            # linked by hand or created while requests were switched off.
            posted = await self.reply_once(
                ref,
                f"linked-{incident_id}",
                _(
                    "mdr-connector created MDR incident {incident_id} for this ticket, but the incident is synced "
                    "with ticket {ticket_key}; follow it there."
                ).format(incident_id=code_span(incident_id), ticket_key=code_span(existing.ticket_key or "")),
            )
            if posted:
                log.warning(
                    "sync.request.linked_elsewhere",
                    extra={
                        "connection": self.name,
                        "ticket_key": ref.key,
                        "incident_id": incident_id,
                        "linked_ticket_key": existing.ticket_key,
                    },
                )
            return True

        await self.context.tickets.set_correlation(ref, incident_id)
        await self.context.store.record_link(
            self.name,
            incident_id,
            incident.incident_number,
            ticket_key=ref.key,
            ticket_id=ref.id,
            ticket_url=ref.url,
            fields_hash=None,
        )
        log.info(
            "sync.request.linked",
            extra={"connection": self.name, "ticket_key": ref.key, "incident_id": incident_id},
        )
        return True

    async def reply_once(self, ref: TicketRef, key: str, message: str) -> bool:
        """Post a reply comment on the ticket once per `key`; return False when it was already there.

        A reply whose outcome is unknown is found by its marker among the
        ticket's comments before it is posted again.
        """
        source_id = f"request:{key}"
        scope = request_scope(ref)
        rows = await self.context.store.get_items(self.name, scope, REQUEST_NOTE)
        row = next((item for item in rows if item.source_id == source_id), None)
        if row is not None and row.state == DONE:
            return False
        if row is not None:
            comments = await self.context.read(lambda: self.context.tickets.list_comments(ref))
            marker = SyncMarker(origin=NOTICE_ORIGIN, source_id=source_id)
            landed = next((comment for comment in comments if comment.marker == marker), None)
            if landed is not None:
                await self.context.store.finish_item(
                    self.name, scope, REQUEST_NOTE, TICKET_TO_MDR, source_id, landed.id
                )
                return False

        draft = CommentDraft(
            body=message,
            marker=SyncMarker(origin=NOTICE_ORIGIN, source_id=source_id),
            visibility=comment_visibility(self.context.mapping),
        )
        await self.context.store.start_item(self.name, scope, REQUEST_NOTE, TICKET_TO_MDR, source_id)
        posted = await self.context.tickets.add_comment(ref, draft)
        await self.context.store.finish_item(self.name, scope, REQUEST_NOTE, TICKET_TO_MDR, source_id, posted.id)
        log.info(
            "sync.request.replied",
            extra={"connection": self.name, "ticket_key": ref.key, "comment_id": posted.id},
        )
        return True

    # Helpers

    async def _intent(self, ref: TicketRef) -> SyncedItem | None:
        rows = await self.context.store.get_items(self.name, request_scope(ref), REQUEST)
        return next((item for item in rows if item.source_id == ref.id), None)

    async def _replied(self, ref: TicketRef, key: str) -> bool:
        rows = await self.context.store.get_items(self.name, request_scope(ref), REQUEST_NOTE)
        return any(item.source_id == f"request:{key}" and item.state == DONE for item in rows)

    async def _finish_intent(self, ref: TicketRef, incident: Incident, digest: str | None, event: str) -> None:
        await self.context.store.finish_item(
            self.name, request_scope(ref), REQUEST, TICKET_TO_MDR, ref.id, incident.incident_id, source_version=digest
        )
        self.context.stats.incidents_created += 1
        log.info(
            event,
            extra={
                "connection": self.name,
                "ticket_key": ref.key,
                "incident_id": incident.incident_id,
                "incident_number": incident.incident_number,
            },
        )

    async def _park(self, ref: TicketRef, err: ConnectorError) -> None:
        sync = self.context.settings.sync
        self.context.stats.failures += 1
        reason = f"{type(err).__name__}: {err}"
        log.error("sync.request.failed", extra={"connection": self.name, "ticket_key": ref.key, "error": reason})
        existing = await self.context.store.get_parked(self.name, PARKED_REQUEST, ref.id)
        attempts = (existing.attempts if existing else 0) + 1
        next_try = parked_next_try(self.context.clock(), attempts, sync.retry_base_seconds, sync.retry_max_seconds, err)
        await self.context.store.park(self.name, PARKED_REQUEST, ref.id, f"ticket {ref.key}: {reason}", next_try)

    def _client_description(self, ref: TicketRef, description: str) -> str:
        system = system_title(self.context.tickets.system)
        requested = _("Requested in {system} ticket {ticket_key}.").format(system=system, ticket_key=ref.key)
        origin = f"{requested}\n{self._marker(ref)}"
        return f"{description}\n\n{origin}" if description else origin

    def _marker(self, ref: TicketRef) -> str:
        return f"mdr-connector request {self.name}/{ref.id}"

    def _marker_pattern(self, ref: TicketRef) -> re.Pattern[str]:
        # The look-behind and the end of the text stop ticket 1 from matching
        # the marker of ticket 12. Only the marker that ends the description
        # counts, because the ticket's own description, written by anyone who
        # may file a ticket, comes before it and may quote another marker.
        return re.compile(rf"(?<![\w.-]){re.escape(self._marker(ref))}\s*$")

    def _mdr_priority(self, ticket_priority: str, ref: TicketRef) -> str:
        """Map a ticket priority back to HIGH, NORMAL or LOW through the mapping's `priority`."""
        by_name: dict[str, str] = {}
        for mdr_priority in PRIORITIES:
            ticket_name = self.context.mapping.priority.get(mdr_priority)  # type: ignore[call-overload]
            if ticket_name:
                by_name.setdefault(ticket_name.casefold(), mdr_priority)
        mapped = by_name.get(ticket_priority.casefold())
        if mapped is not None:
            return mapped
        log.info(
            "sync.request.priority_defaulted",
            extra={
                "connection": self.name,
                "ticket_key": ref.key,
                "ticket_priority": ticket_priority,
                "priority": DEFAULT_PRIORITY,
            },
        )
        return DEFAULT_PRIORITY

    def _withdraw_hint(self) -> str:
        if self.rules.label:
            return _("remove the label {label} to withdraw the request.").format(label=code_span(self.rules.label))
        return _("move the ticket to another issue type to withdraw the request.")


def requested_ticket_id(incident: Incident, connection: str) -> str | None:
    """Return the id of the ticket this connection created the incident for, from the marker that ends its description.

    A marker quoted elsewhere in the text does not count, so an incident
    whose description merely mentions one still gets its own ticket.
    """
    pattern = rf"(?<![\w.-])mdr-connector request {re.escape(connection)}/([^\s/]+)\s*$"
    match = re.search(pattern, visible_text(incident.client_description))
    return match.group(1) if match else None


def visible_text(description: str) -> str:
    """Return a client description as text: MDR may return it as HTML."""
    return html.unescape(HTML_TAG.sub(" ", description))


def check_request_rules(context: SyncContext) -> None:
    """Raise ConfigError when the request rules would match the tickets the connector creates itself.

    Such a ticket has no link for a moment after its create, and taken for
    a request it would get a second incident.
    """
    mapping = context.mapping
    rules = mapping.create_incidents
    source = f"mapping {context.settings.mapping}"
    if rules.hosts_field is None:
        raise ConfigError(
            f"{source}: create_incidents.enabled is true but create_incidents.hosts_field is not set; "
            "set it to the id of the ticket field that holds the affected hosts (HOSTNAME:asset_id)"
        )
    if rules.label is None and rules.issue_type is None:
        raise ConfigError(
            f"{source}: create_incidents needs a label or an issue_type; without either every ticket "
            "of the project would ask for an MDR incident"
        )

    own_labels = {CONNECTOR_LABEL, *mapping.labels} | {label for route in mapping.routes for label in route.labels}
    if rules.label is not None and rules.label in own_labels:
        raise ConfigError(
            f"{source}: create_incidents.label {rules.label!r} is also a label the connector puts on the "
            "tickets it creates; use a label of its own, such as mdr-create"
        )
    own_types = {mapping.issue_type} | {route.issue_type for route in mapping.routes if route.issue_type}
    if rules.label is None and rules.issue_type in own_types:
        raise ConfigError(
            f"{source}: create_incidents.issue_type {rules.issue_type!r} is also the issue type of the tickets "
            "the connector creates; set create_incidents.label too, or use another issue type"
        )


def text_value(state: TicketState, field_id: str) -> str:
    """Return a ticket field value as text: a plain string, or the name of an option such as a priority."""
    value = state.values.get(field_id)
    if isinstance(value, dict):
        value = value.get("name") or value.get("value")
    return "" if value is None else str(value).strip()


def parse_hosts(value: object) -> tuple[list[str], list[str]]:
    """Split a hosts field into valid `HOSTNAME:asset_id` entries and invalid ones.

    The field may be a text with one entry per line or comma, or a list of such texts.
    """
    texts = value if isinstance(value, list) else [value]
    entries = [
        entry.strip()
        for text in texts
        if isinstance(text, str)
        for entry in re.split(r"[\n,;]", text)
        if entry.strip()
    ]
    valid = [entry for entry in entries if HOST_ENTRY.match(entry)]
    invalid = [entry for entry in entries if not HOST_ENTRY.match(entry)]
    return list(dict.fromkeys(valid)), invalid
