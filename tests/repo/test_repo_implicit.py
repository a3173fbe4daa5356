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

ROOT = Path(__file__).resolve().parents[2]


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
