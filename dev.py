#!/usr/bin/env python3
"""Set up a virtual environment in .venv, then run the demo or the tests.

    python3 dev.py demo [ARGS...]   runs `mdr-connector demo ARGS...`
    python3 dev.py test [ARGS...]   runs the test suite (ARGS go to pytest)

Without ARGS, the tests run on one pytest-xdist worker per CPU (two to
eight), because most of them wait on sockets and child processes; with ARGS,
pytest runs with them, in one process unless ARGS include `-n`.

Only the Python standard library is used here, so a machine that has
nothing but Python 3.11+ can run it. The install step is skipped when
pyproject.toml and constraints.txt have not changed since the last one.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
STAMP = VENV / ".installed"
INSTALL_INPUTS = ("pyproject.toml", "constraints.txt")


def venv_python() -> Path:
    if os.name == "nt":
        return VENV / "Scripts" / "python.exe"
    return VENV / "bin" / "python"


def inputs_digest() -> str:
    digest = hashlib.sha256()
    for name in INSTALL_INPUTS:
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()


def ensure_installed() -> None:
    if sys.version_info < (3, 11):
        sys.exit(f"Python 3.11 or newer is required, this is {sys.version.split()[0]}")

    if not venv_python().exists():
        print(f"dev.py: creating the virtual environment in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)

    digest = inputs_digest()
    if STAMP.exists() and STAMP.read_text() == digest:
        return

    print("dev.py: installing mdr-connector and its test dependencies", flush=True)
    pip = [str(venv_python()), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--upgrade", "pip", "setuptools", "wheel"], check=True)
    subprocess.run(
        [*pip, "install", "-c", str(ROOT / "constraints.txt"), "-e", f"{ROOT}[test,postgres]"],
        check=True,
    )
    STAMP.write_text(digest)


def worker_count() -> int:
    """Return the CPUs this process may run on, from 2 to 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(max(cpus, 2), 8)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"demo", "test"}:
        print(__doc__, file=sys.stderr)
        return 2

    ensure_installed()
    command, rest = argv[0], argv[1:]
    if command == "demo":
        executable = VENV / ("Scripts" if os.name == "nt" else "bin") / "mdr-connector"
        return subprocess.run([str(executable), "demo", *rest], cwd=ROOT).returncode
    if not rest:
        rest = ["-n", str(worker_count()), "--dist", "loadgroup"]
    return subprocess.run([str(venv_python()), "-m", "pytest", *rest], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
