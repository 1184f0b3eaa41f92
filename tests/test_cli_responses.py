"""`mdr-connector responses list|confirm|decline`, run as a separate process against the simulators on loopback."""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import Any

import pytest
from fixtures_jira import RunningJira
from fixtures_mdr import MDR_CLIENT_ID
from test_cli import activated_config, jira, run_cli  # noqa: F401 - fixtures used by name

from mdr_connector.adapters.mdr.simulator import MdrSimulator
from mdr_connector.connector.cli import main
from mdr_connector.connector.config import load_settings
from mdr_connector.connector.store import Store
from mdr_connector.connector.tickets import NOTICE_ORIGIN, RESPONSE_ORIGIN

ACTOR = f"cli:{getpass.getuser()}"


def seed_with_responses(mdr_sim: MdrSimulator, count: int) -> tuple[dict[str, Any], list[str]]:
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    ids = [mdr_sim.add_response(MDR_CLIENT_ID, incident["incident_id"])["response_id"] for _ in range(count)]
    return incident, ids


def response_state(mdr_sim: MdrSimulator, incident_id: str, response_id: str) -> dict[str, Any]:
    responses = mdr_sim.incident(MDR_CLIENT_ID, incident_id)["responses"]
    [found] = [response for response in responses if response["response_id"] == response_id]
    return found


async def decisions(config: Path, incident_id: str) -> list[Any]:
    store = await Store.open(load_settings(config).resolved_database_url())
    try:
        return await store.list_decisions("main", incident_id=incident_id)
    finally:
        await store.close()


def comments_with_origin(jira: RunningJira, origin: str) -> list[Any]:
    return [
        comment
        for issue in jira.sim.issues.values()
        for comment in issue.comments
        if comment.properties.get("mdr-connector", {}).get("origin") == origin
    ]


def notices(jira: RunningJira) -> list[Any]:
    return comments_with_origin(jira, NOTICE_ORIGIN)


@pytest.mark.parametrize(
    "argv",
    [["responses"], ["responses", "list"], ["responses", "confirm"], ["responses", "decline"]],
    ids=lambda argv: " ".join(argv),
)
def test_responses_commands_have_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Each responses command prints its help and exits 0."""
    with pytest.raises(SystemExit) as caught:
        main([*argv, "--help"])

    assert caught.value.code == 0
    assert "usage: mdr-connector responses" in capsys.readouterr().out


def test_responses_alone_shows_its_commands(capsys: pytest.CaptureFixture[str]) -> None:
    """`responses` without a subcommand lists list, confirm and decline and exits 2."""
    code = main(["responses"])

    out = capsys.readouterr().out
    assert code == 2
    assert "confirm" in out
    assert "decline" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["responses", "confirm", "MDR_1", "--incident", "I"], "--reason"),
        (["responses", "confirm", "MDR_1", "--reason", "ok"], "--incident"),
        (["responses", "confirm", "--incident", "I", "--reason", "ok"], "RESPONSE_ID"),
        (["responses", "decline", "MDR_1", "--incident", "I", "--reason", "  "], "expected a reason"),
        (["responses", "decline", "MDR 1", "--incident", "I", "--reason", "ok"], "expected a response id"),
    ],
    ids=["no-reason", "no-incident", "no-id", "blank-reason", "id-with-space"],
)
def test_decide_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing or invalid argument exits 2 and names the argument."""
    with pytest.raises(SystemExit) as caught:
        main(argv)

    assert caught.value.code == 2
    assert message in capsys.readouterr().err


async def test_list_one_incident(activated_config: Path, mdr_sim: MdrSimulator) -> None:
    """`responses list --incident` prints each response with type, status, host, asset and time."""
    incident, ids = seed_with_responses(mdr_sim, 2)
    host_name, asset_id = incident["affected_hosts"][0].split(":")

    code, out, err = await run_cli(
        "--config", str(activated_config), "responses", "list", f"--incident={incident['incident_id']}"
    )

    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"incident {incident['incident_id']} (no linked ticket)"
    for response_id, line in zip(ids, lines[1:], strict=True):
        assert line.startswith(f"  {response_id}  RUN_SCRIPT  New  {host_name} ({asset_id})  ")
        assert line.endswith(" UTC")


async def test_list_linked_incidents(activated_config: Path, mdr_sim: MdrSimulator, jira: RunningJira) -> None:
    """Without --incident, the responses of every linked incident are listed under its ticket key."""
    first, first_ids = seed_with_responses(mdr_sim, 1)
    second, second_ids = seed_with_responses(mdr_sim, 1)
    mdr_sim.seed_incident(MDR_CLIENT_ID)
    code, _, err = await run_cli("--config", str(activated_config), "sync", "--once")
    assert code == 0, err

    code, out, err = await run_cli("--config", str(activated_config), "responses", "list")

    assert code == 0, err
    keys = {issue.properties["mdr-connector"]["incident_id"]: issue.key for issue in jira.sim.issues.values()}
    assert f"incident {first['incident_id']} ({keys[first['incident_id']]})" in out
    assert f"incident {second['incident_id']} ({keys[second['incident_id']]})" in out
    assert first_ids[0] in out
    assert second_ids[0] in out
    assert len(out.splitlines()) == 4


async def test_list_without_responses(activated_config: Path, mdr_sim: MdrSimulator) -> None:
    """An incident without responses prints one line saying so."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)

    code, out, _ = await run_cli(
        "--config", str(activated_config), "responses", "list", f"--incident={incident['incident_id']}"
    )

    assert code == 0
    assert out.strip() == "no responses"


async def test_confirm_one_with_audit_and_echo(
    activated_config: Path, mdr_sim: MdrSimulator, jira: RunningJira
) -> None:
    """`confirm` sends one response/update, records the OS user, and echoes on the linked ticket once."""
    incident, [response_id] = seed_with_responses(mdr_sim, 1)
    code, _, err = await run_cli("--config", str(activated_config), "sync", "--once")
    assert code == 0, err
    mdr_sim.reset_counts()

    code, out, err = await run_cli(
        "--config", str(activated_config), "responses", "confirm", response_id,
        f"--incident={incident['incident_id']}", "--reason", "approved  in change 42",
    )

    assert code == 0, err
    [issue] = jira.sim.issues.values()
    assert out.splitlines() == [f"{response_id}: confirmed in MDR", f"decision echoed on ticket {issue.key}"]
    assert mdr_sim.call_counts["response/update"] == 1
    assert mdr_sim.call_counts["responses/update"] == 0
    state = response_state(mdr_sim, incident["incident_id"], response_id)
    assert state["status"] == "Confirmed"
    assert state["comment"] == f"approved in change 42 (by {ACTOR} with the mdr-connector command line)"

    [decision] = await decisions(activated_config, incident["incident_id"])
    assert (decision.response_id, decision.decision, decision.outcome) == (response_id, "confirm", "sent")
    assert (decision.actor_id, decision.actor_name, decision.source) == (ACTOR, getpass.getuser(), "cli")
    assert decision.reason == "approved in change 42"

    [echo] = notices(jira)
    assert response_id in echo.body
    assert "command line" in echo.body

    code, _, err = await run_cli("--config", str(activated_config), "sync", "--once")

    assert code == 0, err
    assert len(notices(jira)) == 1
    [view] = comments_with_origin(jira, RESPONSE_ORIGIN)
    assert "Confirmed" in view.body
    assert mdr_sim.comments(MDR_CLIENT_ID, incident["incident_id"]) == []


async def test_confirm_again_sends_nothing(activated_config: Path, mdr_sim: MdrSimulator) -> None:
    """A second identical confirm reports the status, sends nothing and records nothing."""
    incident, [response_id] = seed_with_responses(mdr_sim, 1)
    arguments = ["--config", str(activated_config), "responses", "confirm", response_id,
                 f"--incident={incident['incident_id']}", "--reason", "ok"]
    code, out, err = await run_cli(*arguments)
    assert code == 0, err
    assert f"incident {incident['incident_id']} has no linked ticket, so nothing was echoed" in out

    code, out, err = await run_cli(*arguments)

    assert code == 0, err
    assert out.splitlines() == [f"{response_id}: already Confirmed in MDR; nothing sent"]
    assert mdr_sim.call_counts["response/update"] == 1
    assert len(await decisions(activated_config, incident["incident_id"])) == 1


async def test_decline_several_in_one_call(activated_config: Path, mdr_sim: MdrSimulator) -> None:
    """Several ids go in one responses/update call, with one audit record each."""
    incident, ids = seed_with_responses(mdr_sim, 3)

    code, out, err = await run_cli(
        "--config", str(activated_config), "responses", "decline", *ids[:2],
        f"--incident={incident['incident_id']}", "--reason", "not during business hours",
    )

    assert code == 0, err
    assert mdr_sim.call_counts["responses/update"] == 1
    assert mdr_sim.call_counts["response/update"] == 0
    statuses = [response_state(mdr_sim, incident["incident_id"], response_id)["status"] for response_id in ids]
    assert statuses == ["Declined", "Declined", "New"]
    recorded = await decisions(activated_config, incident["incident_id"])
    assert sorted(row.response_id for row in recorded) == sorted(ids[:2])
    assert {(row.decision, row.outcome, row.actor_id) for row in recorded} == {("decline", "sent", ACTOR)}


async def test_wrong_status_sends_nothing(activated_config: Path, mdr_sim: MdrSimulator) -> None:
    """A response in another status stops the whole command before anything is sent."""
    incident, ids = seed_with_responses(mdr_sim, 2)
    code, _, err = await run_cli(
        "--config", str(activated_config), "responses", "decline", ids[0],
        f"--incident={incident['incident_id']}", "--reason", "no",
    )
    assert code == 0, err

    code, out, err = await run_cli(
        "--config", str(activated_config), "responses", "confirm", ids[1], ids[0],
        f"--incident={incident['incident_id']}", "--reason", "yes",
    )

    assert code == 1
    assert err.strip() == (
        f"mdr-connector: error: response {ids[0]} is Declined, and only a response in status New "
        "can be confirmed or declined"
    )
    assert response_state(mdr_sim, incident["incident_id"], ids[1])["status"] == "New"
    assert mdr_sim.call_counts["responses/update"] == 0
    assert len(await decisions(activated_config, incident["incident_id"])) == 1


async def test_unknown_response_id(activated_config: Path, mdr_sim: MdrSimulator) -> None:
    """An id that is not a response of the incident exits 1 and names how to list them."""
    incident, _ = seed_with_responses(mdr_sim, 1)

    code, _, err = await run_cli(
        "--config", str(activated_config), "responses", "confirm", "MDR_missing",
        f"--incident={incident['incident_id']}", "--reason", "yes",
    )

    assert code == 1
    assert f"response MDR_missing is not a response of MDR incident {incident['incident_id']}" in err
    assert f"mdr-connector responses list --incident={incident['incident_id']}" in err
    assert mdr_sim.call_counts["response/update"] == 0


async def test_russian_decision_messages(activated_config: Path, mdr_sim: MdrSimulator) -> None:
    """With --lang ru the outcome lines are in Russian."""
    incident, [response_id] = seed_with_responses(mdr_sim, 1)

    code, out, err = await run_cli(
        "--config", str(activated_config), "--lang", "ru", "responses", "decline", response_id,
        f"--incident={incident['incident_id']}", "--reason", "нет",
    )

    assert code == 0, err
    assert f"{response_id}: отклонено в MDR" in out
    assert response_state(mdr_sim, incident["incident_id"], response_id)["comment"].startswith("нет (автор решения: cli:")
