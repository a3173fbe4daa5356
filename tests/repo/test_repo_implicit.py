"""The implicit-differentiation benchmark (benchmarks/implicit.py) and example
(examples/hpo_l2_implicit.py) at smoke sizes, so they never rot.

Only this project runs in the benchmark here (TorchOpt needs its own venv: the full run is
`nox -s bench`, by hand). It must write its table and JSON, and our hypergradients must match
the closed-form implicit formula on every workload.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_benchmark_smoke_table_and_accuracy(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "implicit.py"), "--smoke", "--threads", "1",
         "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HIGHER_BENCH_CACHE": str(tmp_path)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "implicit.md").read_text()
    assert "| workload | contender |" in table
    result = json.loads((tmp_path / "implicit.json").read_text())
    assert set(result["rows"]) == {"ridge-cg", "logistic-cg", "ridge-direct"}
    for workload, rows in result["rows"].items():
        assert set(rows) == {"higher (this): hypergrad", "higher (this): custom_root"}, workload
        for name, row in rows.items():
            # float64 workloads to the solver's tolerance; float32 to float32's
            bound = 1e-4 if workload == "logistic-cg" else 1e-8
            assert row["rel_err"] < bound, (workload, name, row)
            assert row["median_ms"] > 0 and row["rss_peak_mib"] > 0
            assert f"| {workload} | **{name}** |" in table
        solve = result["our_solves"][workload]
        assert solve["relative_residual"] < (1e-5 if workload == "logistic-cg" else 1e-10)
    assert re.search(r"- ridge-cg: cg, \d+ iteration\(s\)", table)


@pytest.mark.slow
def test_example_smoke_prints_both_runs_and_saves_the_curve(tmp_path: Path) -> None:
    out = tmp_path / "curve.png"
    env = {k: v for k, v in os.environ.items() if k != "HIGHER_EXAMPLES_SMOKE"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "hpo_l2_implicit.py"), "--smoke", "--out",
         str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ConvergenceWarning" not in done.stderr
    found = dict(
        re.findall(r"^\s+(shared penalty|per-pixel).*?validation loss ([\d.]+)", done.stdout, re.M)
    )
    assert set(found) == {"shared penalty", "per-pixel"}, done.stdout
    assert all(0 < float(v) < 3 for v in found.values())
    assert str(out) in done.stdout
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.slow
def test_unroll_comparison_smoke(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "implicit_vs_unroll.py"), "--smoke", "--out",
         str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "implicit_vs_unroll.json").read_text())["rows"]
    assert set(rows) == {
        "unrolled",
        "unrolled, recompute",
        "truncated (last 10%)",
        "implicit (CG)",
        "implicit (CG), L-BFGS inner",
    }
    for name, points in rows.items():
        errors = [p["error"] for p in points]
        # more inner steps: closer to the optimum, a more accurate hypergradient
        assert errors == sorted(errors, reverse=True) and 0 < errors[-1] < 1, (name, errors)
        assert all(p["peak_mib"] > 0 for p in points), name
    # recompute is the unrolled hypergradient itself, rebuilt in the backward pass
    for exact, rebuilt in zip(rows["unrolled"], rows["unrolled, recompute"], strict=True):
        assert abs(exact["error"] - rebuilt["error"]) <= 1e-9 * exact["error"]
    assert (tmp_path / "implicit_vs_unroll.png").stat().st_size > 1000
