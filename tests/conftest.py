"""Shared pytest configuration: the simulator fixtures live in plugin modules."""

pytest_plugins = ["fixtures_mdr", "fixtures_jira", "fixtures_sync"]
