"""The performance report's own plumbing: config files it writes, verdicts, tables, CPU reads.

The report's figures are measurements (not asserted here: tests never assert speed); what is
asserted is that the pieces that turn them into a verdict say what they mean. Independent truths:
tomllib reading back the TOML the report writes for the server, arithmetic on the ratios, and
the kernel's own accounting of a child process's CPU time.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tomllib

import pytest

from bench.report_markdown import Target, table, targets_table
from bench.report_serving import flowserve_config, tree_cpu_seconds
from bench.server_process import to_toml


@pytest.mark.parametrize("policy", ["step", "request"])
def test_server_config_round_trips_through_tomllib(policy: str) -> None:
    config = {"torch_threads": 1, **flowserve_config(policy)}
    assert tomllib.loads(to_toml(config)) == config


def test_strings_with_quotes_survive_toml() -> None:
    config = {"store": {"path": 'a "quoted" \\ path'}, "enabled": True}
    assert tomllib.loads(to_toml(config)) == config


def test_target_verdict_and_shortfall() -> None:
    assert Target("x", 4.0, 4.0).met
    missed = Target("y", 3.0, 4.0, "why")
    assert not missed.met
    assert missed.verdict == "**MISSED** by 25%"  # 3 is 25% below 4
    rendered = targets_table([missed])
    assert "| y | 3.00x | >= 4x | **MISSED** by 25% |" in rendered


def test_table_has_a_separator_per_column() -> None:
    lines = table(["a", "b", "c"], [(1, 2, 3)]).splitlines()
    assert lines == ["| a | b | c |", "|---|---|---|", "| 1 | 2 | 3 |"]


def test_tree_cpu_counts_a_child_that_burns_cpu() -> None:
    # The child burns at least 0.3 s of its own CPU time (measured by itself with
    # process_time) and then sleeps; the tree read must include it, within the clock tick.
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\n"
            "while time.process_time() < 0.3: pass\n"
            "print('burnt', flush=True)\n"
            "time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "burnt"
        seconds = tree_cpu_seconds(os.getpid())
        assert tree_cpu_seconds(child.pid) >= 0.3 - 2 / os.sysconf("SC_CLK_TCK")
        assert seconds >= tree_cpu_seconds(child.pid)  # the parent's tree holds the child
    finally:
        child.kill()
        child.wait(timeout=10)
    assert not math.isnan(seconds)
