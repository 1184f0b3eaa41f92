"""The `backend` fixture: every contract test runs once per ticket system.

A backend whose module or adapter does not exist yet is skipped with the
name of what is missing. Redmine is the exception under CI=true: there a
missing Redmine backend fails, so CI cannot pass without the real server.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import pytest

from contract.backends import BACKEND_IDS, ContractBackend

# Backends that must run under CI=true instead of being skipped.
REQUIRED_IN_CI = frozenset({"redmine"})


def load_backend_module(backend_id: str) -> ModuleType:
    """Import `contract.backend_<id>`, skipping the test when the module or its adapter is missing."""
    module_name = f"contract.backend_{backend_id}"
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        # Only a missing backend or adapter module means "not written yet";
        # any other missing import is a bug that must show as an error.
        if err.name != module_name and not (err.name or "").startswith("mdr_connector.adapters."):
            raise
        reason = f"the {backend_id} contract backend cannot run: module {err.name} does not exist"
        if backend_id in REQUIRED_IN_CI and os.environ.get("CI") == "true":
            pytest.fail(f"{reason}, and CI=true requires it", pytrace=False)
        pytest.skip(reason)


@pytest.fixture(params=BACKEND_IDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ContractBackend]:
    """One ticket system, ready for `await backend.open()`; everything it started stops when the test ends."""
    module = load_backend_module(request.param)
    async with module.contract_backend(tmp_path, monkeypatch) as started:
        yield started
