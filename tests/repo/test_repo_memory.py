"""The memory benchmark (benchmarks/memory.py) and the long-unroll example
(examples/hpo_long_unroll.py) at smoke sizes, so they never rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_memory_benchmark_smoke(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "memory.py"), "--smoke", "--threads", "1",
         "--workloads", "mem-mlp", "mem-conv-hpo", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "memory.md").read_text()
    assert "| workload | contender | k | peak MiB |" in table
    assert "Largest k that fits in 8 GiB" in table
    assert (tmp_path / "memory.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    rows = json.loads((tmp_path / "memory.json").read_text())["rows"]
    assert set(rows["mem-mlp"]) == {"higher full", "higher recompute", "higher recompute, every 10"}
    assert set(rows["mem-conv-hpo"]) == {
        "higher full",
        "higher recompute",
        "higher truncated, W=10",
        "higher forward",
    }
    for workload, by_name in rows.items():
        for name, row in by_name.items():
            for k, point in row["points"].items():
                assert point["peak_mib"] > 0 and point["seconds"] > 0, (workload, name, k)
                if "truncated" not in name:  # the exact modes: float32 round-off from full
                    assert point["max_rel_diff"] < 1e-4, (workload, name, k, point)
    # the full graph grows with k, forward mode's memory does not
    full, forward = rows["mem-conv-hpo"]["higher full"], rows["mem-conv-hpo"]["higher forward"]
    assert full["points"]["4"]["peak_mib"] > full["points"]["2"]["peak_mib"]
    assert forward["fits_8gib"] == float("inf")


@pytest.mark.slow
def test_long_unroll_example_smoke(tmp_path: Path) -> None:
    out = tmp_path / "hpo.png"
    env = {k: v for k, v in os.environ.items() if k != "HIGHER_EXAMPLES_SMOKE"}
    script = str(ROOT / "examples" / "hpo_long_unroll.py")
    done = subprocess.run(
        [sys.executable, script, "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "validation loss after 4 steps:" in done.stdout
    assert done.stdout.count("  lr[") == 8
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    measured = subprocess.run(
        [sys.executable, script, "--smoke", "--measure"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert measured.returncode == 0, measured.stderr[-3000:]
    lines = [line.split() for line in measured.stdout.splitlines() if line.startswith("  ")]
    assert [line[0] for line in lines] == ["full", "recompute"]
