"""A plain `pip install .` (a wheel, not the editable checkout) gives a working service."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from this checkout, without dependencies."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    [built] = out.glob("mdr_connector-*.whl")
    return built


def test_wheel_ships_data_files(wheel: Path) -> None:
    """Default mappings, migrations, translations and simulators are inside the wheel."""
    names = set(zipfile.ZipFile(wheel).namelist())

    for expected in (
        "mdr_connector/mappings/jira.yaml",
        "mdr_connector/migrations/env.py",
        "mdr_connector/migrations/script.py.mako",
        "mdr_connector/migrations/versions/0001_initial.py",
        "mdr_connector/migrations/versions/0002_items_audit_assets.py",
        "mdr_connector/connector/locale/ru.po",
        "mdr_connector/connector/pandoc_worker.lua",
        "mdr_connector/adapters/mdr/simulator/state.py",
        "mdr_connector/adapters/jira/simulator.py",
    ):
        assert expected in names
    assert not any(name.startswith(("connector/", "adapters/", "tests/")) for name in names)


def test_installed_wheel_runs_demo(wheel: Path, tmp_path: Path) -> None:
    """The demo runs from the installed wheel, whose import name is mdr_connector only."""
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    environment = {**os.environ, "PYTHONPATH": str(target), "LANG": "C.UTF-8"}
    probe = subprocess.run(
        [sys.executable, "-c", "import mdr_connector.connector.cli as cli; print(cli.__file__)"],
        env=environment, cwd=tmp_path, capture_output=True, text=True, check=True,
    )
    assert probe.stdout.strip().startswith(str(target))

    demo = subprocess.run(
        [sys.executable, "-m", "mdr_connector.connector.cli", "demo", "--incidents", "2"],
        env=environment, cwd=tmp_path, capture_output=True, text=True, timeout=180,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "check: one ticket per incident" in demo.stdout
