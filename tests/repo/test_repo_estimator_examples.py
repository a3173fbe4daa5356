"""The gradient-estimator examples at smoke size, and the committed results of their full runs.

examples/influence_balancing.py (truncated backprop is biased, PES is not),
examples/chaotic_unroll.py (the exact hypergradient of a long unroll is chaotic, ES's is not)
and examples/estimator_tradeoffs.py (bias, variance and cost of each estimator) run in a
subprocess at their `--smoke` size; the JSON and markdown their full runs wrote under
examples/results/ must say what the scripts' docstrings and the docs claim.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
RESULTS = EXAMPLES / "results"
PNG = b"\x89PNG\r\n\x1a\n"


def smoke(script: str, *extra: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "HIGHER_EXAMPLES_SMOKE"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--smoke", *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def closed_form_optimum(n: int, p: int, steps: int) -> float:
    """θ* of the influence-balancing system, recomputed here without torch: s[0]_t = c_t θ."""
    s, c = [0.0] * n, []
    b = [1.0] * p + [-1.0] * (n - p)
    for _ in range(steps):
        s = [0.5 * s[i] + (0.5 * s[i + 1] if i + 1 < n else 0.0) + b[i] for i in range(n)]
        c.append(s[0])
    return sum(c) / sum(x * x for x in c)


@pytest.mark.slow
def test_influence_balancing_smoke_pes_ends_nearer_the_optimum(tmp_path: Path) -> None:
    out, results = tmp_path / "ib.png", tmp_path / "ib.json"
    stdout = smoke("influence_balancing.py", "--out", str(out), "--results", str(results))
    star = float(re.search(r"optimum of the total loss θ\* = (-?[\d.]+)", stdout)[1])  # type: ignore[index]
    found = json.loads(results.read_text())
    assert found["theta_star"] == pytest.approx(closed_form_optimum(23, 10, 200), abs=1e-12)
    assert round(found["theta_star"], 4) == star
    runs = found["runs"]
    assert abs(runs["full backprop (K=T)"]["final_theta"] - star) < 1e-3
    for k in (1, 10, 50):
        pes = abs(runs[f"PES K={k}"]["final_theta"] - star)
        tbptt = abs(runs[f"TBPTT K={k}"]["final_theta"] - star)
        tes = abs(runs[f"TES K={k}"]["final_theta"] - star)
        assert pes < 0.1 and tbptt > 0.3 and tes > 0.3, (k, pes, tbptt, tes)
        assert re.search(rf"^\| PES K={k} \| -?[\d.]+ \|", stdout, re.M), stdout
    # every truncation of the smoke problem has the wrong sign: its zero repels
    assert all(not point["stable"] for point in found["truncated_fixed_points"].values())
    assert str(out) in stdout and out.read_bytes().startswith(PNG)


@pytest.mark.slow
def test_chaotic_unroll_smoke_prints_the_grid_and_saves_the_figure(tmp_path: Path) -> None:
    out, results = tmp_path / "chaos.png", tmp_path / "chaos.json"
    stdout = smoke("chaotic_unroll.py", "--out", str(out), "--results", str(results))
    number = r"[-+]?(?:[\d.]+(?:e[-+]\d+)?|nan)"
    row = rf"^\| ({number}) \| ({number}) \| ({number}) \| ({number}) ± ({number}) \|$"
    rows = re.findall(row, stdout, re.M)
    assert len(rows) == 8, stdout
    grid = json.loads(results.read_text())["grid"]
    first = grid[0]
    assert first["lr"] == pytest.approx(0.02) and 0 < first["meta_loss"] < 0.5
    # the smooth end: descending lr lowers the loss, and ES agrees with backprop within 3 stderr
    assert first["backprop_grad"] < 0
    assert abs(first["es_grad"] - first["backprop_grad"]) < 3 * first["es_stderr"]
    assert all(0 < r["meta_loss"] <= 0.5 for r in grid)
    assert re.search(r"^meta-training on backprop: lr 0\.020 -> ", stdout, re.M)
    assert re.search(r"^meta-training on ES: lr 0\.020 -> ", stdout, re.M)
    assert str(out) in stdout and out.read_bytes().startswith(PNG)


@pytest.mark.slow
def test_estimator_tradeoffs_smoke_measures_bias_and_variance(tmp_path: Path) -> None:
    stdout = smoke("estimator_tradeoffs.py", "--out-dir", str(tmp_path))
    table = (tmp_path / "estimator_tradeoffs.md").read_text()
    assert table.startswith("`python examples/estimator_tradeoffs.py --smoke`")
    assert table in stdout
    rows = {(r["method"], r["K"]): r for r in json.loads(
        (tmp_path / "estimator_tradeoffs.json").read_text())["influence_balancing"]}  # fmt: skip
    full = rows["backprop", 200]
    assert abs(full["bias"]) < 1e-9 * abs(full["truth"])
    # at θ = 0 each one-step truncation's gradient is (0 - 1) * 1: the episode's is -T
    assert rows["TruncatedBackprop", 1]["mean"] == pytest.approx(-200)
    assert full["truth"] > 0  # the sign truncated backprop gets wrong
    for k in (1, 10, 50):
        assert rows["TruncatedBackprop", k]["bias"] < -0.5 * full["truth"]
        assert rows["TruncatedES", k]["bias"] < -0.5 * full["truth"]
        assert rows["PES", k]["std_over_seeds"] > 0
    assert abs(rows["PES", 10]["bias_in_stderrs"]) < 4
    assert abs(rows["ES", 200]["bias_in_stderrs"]) < 4


# -- the committed full-size results ------------------------------------------------------------


def committed(name: str) -> Any:
    return json.loads((RESULTS / name).read_text("utf-8"))


def test_influence_balancing_results_pes_finds_the_optimum_truncated_backprop_does_not() -> None:
    found = committed("influence_balancing.json")
    config = found["config"]
    assert (config["dim"], config["positive"], config["steps"]) == (23, 10, 1000)
    assert not config["smoke"]
    star = found["theta_star"]
    assert star == pytest.approx(closed_form_optimum(23, 10, 1000), abs=1e-12)
    docstring = (EXAMPLES / "influence_balancing.py").read_text()
    assert f"θ* = Σ c_t / Σ c_t^2 ({star:.4f} for T = 1000" in " ".join(docstring.split())
    runs = found["runs"]
    assert abs(runs["full backprop (K=T)"]["final_theta"] - star) < 1e-6
    for k in (1, 10, 100):
        assert abs(runs[f"PES K={k}"]["tail_mean"] - star) < 0.015, k
    fixed = found["truncated_fixed_points"]
    for short in ("1", "10"):  # wrong sign: pushed away, without bound
        assert not fixed[short]["stable"]
        assert runs[f"TBPTT K={short}"]["diverged"] and runs[f"TES K={short}"]["diverged"]
    # K = 100 converges, to the zero of its own biased gradient: the wrong sign of θ*
    assert fixed["100"]["stable"] and fixed["100"]["theta"] > 0 > star
    for name in ("TBPTT K=100", "TES K=100"):
        assert not runs[name]["diverged"]
        assert abs(runs[name]["tail_mean"] - fixed["100"]["theta"]) < 0.03, name


def test_chaotic_unroll_results_backprop_is_chaotic_es_is_not() -> None:
    found = committed("chaotic_unroll.json")
    assert found["config"]["steps"] == 300 and not found["config"]["smoke"]
    smooth, chaotic = found["summary"]["smooth"], found["summary"]["chaotic"]
    assert smooth["points"] >= 10 and chaotic["points"] >= 10
    assert smooth["backprop_sign_changes"] == 0
    assert chaotic["backprop_sign_changes"] >= chaotic["points"] // 2
    # in the chaotic part the exact gradient spans orders of magnitude, ES's stays small
    assert chaotic["backprop_abs_grad_max"] > 100 * chaotic["backprop_abs_grad_min"]
    assert chaotic["backprop_abs_grad_max"] > 10 * smooth["backprop_abs_grad_max"]
    assert chaotic["es_stderr_median"] < smooth["backprop_abs_grad_max"]
    for row in found["grid"]:
        if row["lr"] < 0.06:  # where the landscape is smooth, both estimate the same slope
            assert row["backprop_grad"] < 0 and row["es_grad"] < 0, row


def test_estimator_tradeoffs_table_is_the_json() -> None:
    table = (RESULTS / "estimator_tradeoffs.md").read_text("utf-8")
    found = committed("estimator_tradeoffs.json")
    assert table.startswith("`python examples/estimator_tradeoffs.py`")
    rows = found["influence_balancing"]
    truth = rows[0]["truth"]
    assert truth == pytest.approx(-sum_c(23, 10, 1000))
    for row in rows:
        cells = f"| {row['mean']:.2f} | {row['bias']:+.2f} |"
        assert cells in table, row
        if row["method"] in ("TruncatedBackprop", "TruncatedES"):
            assert abs(row["bias"]) > 0.5 * abs(truth), row
        if row["method"] in ("PES", "ES"):
            assert abs(row["bias_in_stderrs"]) < 4, row
    for row in found["chaotic"]:
        assert f"| {row['lr']} | {row['meta_loss']:.4f} |" in table
    smooth, chaotic = found["chaotic"]
    # smooth: backprop's gradient barely moves within ±2 % of lr, and ES finds it
    assert smooth["backprop_nearby_max"] < 0.9 * smooth["backprop_nearby_min"] < 0
    assert abs(smooth["es_mean"] - smooth["backprop_grad"]) < 3 * smooth["es_std_over_seeds"]
    # chaotic: it flips sign within ±2 %, by far more than ES's spread over seeds
    assert chaotic["backprop_nearby_min"] < 0 < chaotic["backprop_nearby_max"]
    spread = chaotic["backprop_nearby_max"] - chaotic["backprop_nearby_min"]
    assert spread > 30 * chaotic["es_std_over_seeds"]


def sum_c(n: int, p: int, steps: int) -> float:
    """Σ c_t: minus the gradient of the total loss at θ = 0."""
    s, total = [0.0] * n, 0.0
    b = [1.0] * p + [-1.0] * (n - p)
    for _ in range(steps):
        s = [0.5 * s[i] + (0.5 * s[i + 1] if i + 1 < n else 0.0) + b[i] for i in range(n)]
        total += s[0]
    return total


def test_closed_form_helper_matches_the_steady_state() -> None:
    # over a long episode the transient fades and θ* tends to the steady state's 1 / (2 (2p - n))
    long, short = closed_form_optimum(23, 10, 20000), closed_form_optimum(23, 10, 1000)
    assert abs(long + 1 / 6) < 0.002 < abs(short + 1 / 6)
    assert math.isclose(sum_c(3, 3, 1), 1.0)
