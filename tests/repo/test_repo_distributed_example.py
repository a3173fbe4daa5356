"""examples/distributed_maml.py under torchrun (2 CPU processes, gloo on the loopback) prints the
accuracies of one process, and one process prints the demo's."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ACCURACY = re.compile(r"^\s+(MAML|baseline)\b.*?([\d.]+ % ± [\d.]+)$", re.MULTILINE)


def _run(args: list[str], out: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "HIGHER_EXAMPLES_SMOKE"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")  # the loopback, nothing else
    done = subprocess.run(
        [sys.executable, *args, "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    return done.stdout


@pytest.mark.slow
def test_two_processes_print_the_accuracy_of_one(tmp_path: Path) -> None:
    script = str(EXAMPLES / "distributed_maml.py")
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    two = _run([*torchrun, script], tmp_path / "two.png")
    one = _run([script], tmp_path / "one.png")
    demo = _run([str(EXAMPLES / "maml_digits.py")], tmp_path / "demo.png")
    assert "2 processes (torch.distributed, gloo)" in two
    assert "1 process (torch.distributed, gloo)" in one
    accuracies = [dict(ACCURACY.findall(stdout)) for stdout in (two, one, demo)]
    assert set(accuracies[0]) == {"MAML", "baseline"}, two
    assert accuracies[0] == accuracies[1] == accuracies[2]


def test_the_benchmark_smoke_prints_a_step_time_for_1_and_2_processes() -> None:
    script = EXAMPLES.parent / "benchmarks" / "distributed.py"
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo")
    done = subprocess.run(
        [sys.executable, str(script), "--smoke"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = re.findall(r"^\| (\d) process(?:es)?, 1 thread.*? \| ([\d.]+) \|", done.stdout, re.M)
    assert [procs for procs, _ in rows] == ["1", "2"], done.stdout
    assert all(float(ms) > 0 for _, ms in rows)
