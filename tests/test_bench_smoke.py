"""Each benchmark under bench/ still runs end to end with tiny sizes.

The scripts check their own results (every copy arrived, none twice) and
exit 1 when one is missing, so exit status 0 proves a working run. No
figure is asserted: the timings come from a shared machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
TIMEOUT_SECONDS = 300

pytestmark = pytest.mark.slow


def run_bench(script: str, *options: str) -> str:
    """Run one benchmark script with a zero simulator latency; return its stdout after checking its exit status."""
    result = subprocess.run(
        [sys.executable, str(BENCH / script), "--latency-ms", "0", *options],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
        env={**os.environ, "LANG": "C.UTF-8"},
        check=False,
    )
    details = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"
    assert result.returncode == 0, details
    assert "FAIL" not in result.stdout, details
    return result.stdout


def test_idle_cost_runs() -> None:
    output = run_bench("idle_cost.py", "--sizes", "3,5", "--warmup", "1", "--cycles", "1")
    assert "calls per idle cycle, all sizes:" in output
    assert "target: the same small constant" in output


def test_idle_cost_list_source_runs() -> None:
    output = run_bench("idle_cost.py", "--sizes", "3", "--warmup", "1", "--cycles", "1", "--change-source", "list")
    assert "mdr incidents/list" in output


def test_backlog_throughput_runs() -> None:
    output = run_bench("backlog_throughput.py", "--incidents", "3", "--baseline-incidents", "2", "--comments", "1")
    assert "connector  3 incidents" in output
    assert "baseline   2 incidents" in output
    assert "ratio connector / baseline:" in output


def test_propagation_latency_runs() -> None:
    output = run_bench("propagation_latency.py", "--samples", "1", "--interval", "0.5", "--incidents", "2")
    assert "MDR to Jira    n=1" in output
    assert "Jira to MDR    n=1" in output
    assert "target: p95 at most the interval plus 1 s" in output


def test_store_scale_runs() -> None:
    output = run_bench("store_scale.py", "--rows", "12,40", "--changed", "2", "--rounds", "1")
    assert "ratio 40 / 12 links:" in output


def test_attachment_memory_runs() -> None:
    output = run_bench("attachment_memory.py", "--size-mb", "1")
    assert "peak - idle:" in output
    assert output.count("ok  ") == 2


def test_fault_storm_runs() -> None:
    output = run_bench("fault_storm.py", "--incidents", "3", "--minutes", "0", "--seed", "3")
    assert "faults fired, MDR" in output
    assert "final diff:          0" in output
