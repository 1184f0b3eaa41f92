"""Shared pytest configuration: the simulator fixtures live in plugin modules."""

pytest_plugins = ["fixtures_mdr", "fixtures_jira", "fixtures_sync", "fixtures_tls", "fixtures_redmine", "fixtures_servicenow"]

import pytest

from mdr_connector.connector import i18n


@pytest.fixture(autouse=True)
def english_messages():
    """Every test starts with English messages, whatever an earlier `main(["--lang", "ru", ...])` set."""
    i18n.set_language("en")
    yield
    i18n.set_language("en")
