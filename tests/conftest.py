"""Shared pytest configuration: the simulator fixtures live in plugin modules."""

pytest_plugins = ["fixtures_mdr", "fixtures_jira", "fixtures_sync", "fixtures_tls", "fixtures_redmine", "fixtures_servicenow"]

import pytest

from mdr_connector.connector import i18n

# Modules whose tests share one expensive module-scoped run; pytest-xdist
# keeps each on one worker so the run is not repeated per worker.
SHARED_RUN_MODULES = {"test_crash", "test_cluster", "test_packaging"}


# tryfirst: pytest-xdist reads the groups in a hook of its own, which must see these marks.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Group the tests that must not run on two pytest-xdist workers at once.

    The Redmine tests share one real server and its project, so they run on
    one worker: those that use the server fixture, and every test whose id
    names Redmine, such as the contract tests of the Redmine backend. `--dist loadgroup` (the default of `dev.py test`) honours
    the groups; without xdist the marks do nothing.
    """
    for item in items:
        module = item.module.__name__.rpartition(".")[2] if item.module else ""
        if "redmine_server" in getattr(item, "fixturenames", ()) or "redmine" in item.nodeid.lower():
            item.add_marker(pytest.mark.xdist_group("redmine"))
        elif module in SHARED_RUN_MODULES:
            item.add_marker(pytest.mark.xdist_group(module))


@pytest.fixture(autouse=True)
def english_messages():
    """Every test starts with English messages, whatever an earlier `main(["--lang", "ru", ...])` set."""
    i18n.set_language("en")
    yield
    i18n.set_language("en")
