"""The sync engine with the ServiceNow adapter, against the MDR and ServiceNow simulators on loopback."""

from __future__ import annotations

from typing import Any

import pytest
from fixtures_mdr import MDR_CLIENT_ID, MDR_CONNECTION_NAME
from fixtures_postgres import LEDGER_BACKENDS
from fixtures_servicenow import GROUP, ServiceNowSyncHarness

from mdr_connector.adapters.servicenow.simulator import SERVICE_USER
from mdr_connector.adapters.textmarker import split_marker
from mdr_connector.connector.errors import MisconfiguredError
from mdr_connector.connector.tickets import MDR_ORIGIN, RESPONSE_ORIGIN


@pytest.fixture(params=LEDGER_BACKENDS)
def ledger_backend(request: pytest.FixtureRequest) -> str:
    """Every harness test here runs with its ledger on SQLite and again on PostgreSQL."""
    return request.param



def connector_entries(harness: ServiceNowSyncHarness, incident_id: str, origin: str) -> list[dict[str, Any]]:
    """Return the journal entries of the incident's ticket that the connector wrote with a marker of `origin`."""
    entries = []
    for entry in harness.journal_of(incident_id):
        _, marker = split_marker(entry["value"])
        if entry["sys_created_by"] == SERVICE_USER and marker is not None and marker.origin == origin:
            entries.append(entry)
    return entries


async def test_incident_becomes_one_record(sn_harness: ServiceNowSyncHarness) -> None:
    """A HIGH incident becomes one incident record with the mapped fields and its SOC comment as a work note, and stays one."""
    incident = sn_harness.seed(summary="Подозрительный PowerShell", priority="HIGH")
    incident_id = incident["incident_id"]
    sn_harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>Проверьте хост</p>", author="SOC Analyst")

    sync = await sn_harness.cycles(3)

    row = sn_harness.ticket_for(incident_id)
    group = sn_harness.sim.tables["sys_user_group"].rows[row["assignment_group"]]
    [copy] = connector_entries(sn_harness, incident_id, MDR_ORIGIN)
    assert row["short_description"] == f"[MDR-{incident['incident_number']}] Подозрительный PowerShell"
    assert (row["impact"], row["urgency"], row["priority"]) == ("1", "1", "1")
    assert row["category"] == "inquiry"
    assert group["name"] == GROUP
    assert row["correlation_display"] == "mdr-connector"
    assert f"https://mdr.kaspersky.com/incidents/{incident_id}" in row["description"]
    assert copy["element"] == "work_notes"
    assert "SOC Analyst" in copy["value"]
    assert "Проверьте хост" in copy["value"]
    assert sync.stats.tickets_created == 1


async def test_comments_both_ways_once(sn_harness: ServiceNowSyncHarness) -> None:
    """One MDR comment and one ServiceNow comment, three cycles: exactly one copy of each on each side."""
    incident_id = sn_harness.seed()["incident_id"]
    sync = await sn_harness.cycles(1)
    number = sn_harness.ticket_for(incident_id)["number"]

    sn_harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>MDR analyst note</p>", author="Ivan Petrov")
    sn_harness.sim.add_human_comment(number, "ServiceNow engineer note")
    sn_harness.advance(2)
    await sn_harness.cycles(3, sync)

    mdr_texts = [comment["text"] for comment in sn_harness.mdr_comments(incident_id)]
    journal = [entry["value"] for entry in sn_harness.journal_of(incident_id)]
    assert sum("MDR analyst note" in text for text in mdr_texts) == 1
    assert sum("ServiceNow engineer note" in text for text in mdr_texts) == 1
    assert sum("MDR analyst note" in value for value in journal) == 1
    assert sum("ServiceNow engineer note" in value for value in journal) == 1
    assert [comment["author_name"] for comment in sn_harness.mdr_comments(incident_id)].count(MDR_CONNECTION_NAME) == 1
    assert any("SOC Analyst" in text and "ServiceNow" in text and number in text for text in mdr_texts)


async def test_work_notes_stay_internal(sn_harness: ServiceNowSyncHarness) -> None:
    """With `to_mdr: public` a work note stays in ServiceNow while an Additional comment goes to MDR."""
    incident_id = sn_harness.seed()["incident_id"]
    sync = await sn_harness.cycles(1)
    number = sn_harness.ticket_for(incident_id)["number"]

    sn_harness.sim.add_human_comment(number, "Internal triage note", "work_notes")
    sn_harness.sim.add_human_comment(number, "Customer-visible update")
    sn_harness.advance(2)
    await sn_harness.cycles(3, sync)

    mdr_texts = [comment["text"] for comment in sn_harness.mdr_comments(incident_id)]
    assert not any("Internal triage note" in text for text in mdr_texts)
    assert sum("Customer-visible update" in text for text in mdr_texts) == 1


async def test_work_notes_go_with_to_mdr_all(sn_harness: ServiceNowSyncHarness) -> None:
    """With `to_mdr: all` work notes go to MDR too, and without `visibility` the MDR copies are Additional comments."""
    sn_harness.use_mapping(comments={"to_mdr": "all", "on_mdr_delete": "note"})
    incident_id = sn_harness.seed()["incident_id"]
    sn_harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>From the SOC</p>", author="Ivan Petrov")
    sync = await sn_harness.cycles(1)
    number = sn_harness.ticket_for(incident_id)["number"]

    sn_harness.sim.add_human_comment(number, "Internal triage note", "work_notes")
    sn_harness.advance(2)
    await sn_harness.cycles(3, sync)

    mdr_texts = [comment["text"] for comment in sn_harness.mdr_comments(incident_id)]
    [copy] = connector_entries(sn_harness, incident_id, MDR_ORIGIN)
    assert sum("Internal triage note" in text for text in mdr_texts) == 1
    assert copy["element"] == "comments"
    assert "From the SOC" in copy["value"]


async def test_response_status_change_posts_second_view(sn_harness: ServiceNowSyncHarness) -> None:
    """A response shows as one entry, and its status change as a second entry, because entries cannot be edited."""
    incident_id = sn_harness.seed()["incident_id"]
    response = sn_harness.mdr_sim.add_response(MDR_CLIENT_ID, incident_id)
    response_id = response["response_id"]
    sync = await sn_harness.cycles(1)
    [first] = connector_entries(sn_harness, incident_id, RESPONSE_ORIGIN)

    await sync.mdr.update_response(response_id, "Declined", "declined in the MDR console")
    sn_harness.advance(2)
    await sn_harness.cycles(3, sync)

    views = connector_entries(sn_harness, incident_id, RESPONSE_ORIGIN)
    assert len(views) == 2
    assert views[0] == first
    assert all(split_marker(view["value"])[1].source_id.startswith(f"{response_id}.") for view in views)
    assert "Declined" in views[1]["value"]
    assert "declined in the MDR console" in views[1]["value"]
    assert f"/mdr confirm {response_id}" in first["value"]
    assert f"/mdr confirm {response_id}" not in views[1]["value"]


async def test_typed_marker_entry_reaches_mdr(sn_harness: ServiceNowSyncHarness) -> None:
    """A person's entry that ends with a typed marker line is still a person's comment and goes to MDR once."""
    incident_id = sn_harness.seed()["incident_id"]
    sync = await sn_harness.cycles(1)
    number = sn_harness.ticket_for(incident_id)["number"]

    sn_harness.sim.add_human_comment(number, "Looks clean\n\n[mdr-connector mdr:forged-1]")
    sn_harness.advance(2)
    await sn_harness.cycles(3, sync)

    mdr_texts = [comment["text"] for comment in sn_harness.mdr_comments(incident_id)]
    assert sum("Looks clean" in text for text in mdr_texts) == 1


async def test_unreadable_journal_stops_connection(sn_harness: ServiceNowSyncHarness) -> None:
    """When sys_journal_field hides the entries that tickets show, the connection does not open."""
    incident_id = sn_harness.seed()["incident_id"]
    sn_harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>note</p>", author="Ivan Petrov")
    await sn_harness.cycles(1)
    sn_harness.sim.settings.journal_read_denied = True

    with pytest.raises(MisconfiguredError, match="sys_journal_field"):
        await sn_harness.engine()
