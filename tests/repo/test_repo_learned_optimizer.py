"""The learned-optimizer example (examples/learned_optimizer.py) at smoke size, so it never rots,
and its committed full-size results: the JSON and the Markdown table agree, and on every
held-out task the optimizer meta-trained with PES (the weights the plugin ships) ends below Adam
with a tuned learning rate."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "examples" / "results" / "learned_optimizer"
# | digits #100000 (64 tanh) | 0.1368 | 0.1694 | 0.2468 (lr 0.031623) | 0.2468 (lr 0.031623) |
ROW = re.compile(
    r"^\| (?P<task>[^|]+?) \| (?P<pes>[^ |]+) \| (?P<tbptt>[^ |]+) "
    r"\| (?P<tuned>[^ |]+) \(lr (?P<lr>[^)]+)\) \| (?P<best>[^ |]+) \(lr (?P<best_lr>[^)]+)\) \|$"
)


@pytest.mark.slow
def test_smoke_run_prints_the_table_and_saves_the_plot(tmp_path: Path) -> None:
    out, weights = tmp_path / "curves.png", tmp_path / "weights.json"
    env = {k: v for k, v in os.environ.items() if k != "HIGHER_EXAMPLES_SMOKE"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "learned_optimizer.py"), "--smoke", "--out",
         str(out), "--save-weights", str(weights)],
        capture_output=True, text=True, env=env, timeout=180, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [m for m in map(ROW.match, done.stdout.splitlines()) if m]
    assert [m["task"].split(" #")[0] for m in rows] == [
        "digits", "wine", "breast_cancer", "regression"
    ]  # fmt: skip
    for m in rows:
        assert all(float(m[k]) > 0 for k in ("pes", "tbptt", "tuned", "best"))
        assert float(m["best"]) <= float(m["tuned"])
    assert re.search(r"ours \(PES\) below tuned Adam on \d of 4 held-out tasks", done.stdout)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    doc = json.loads(weights.read_text())
    assert doc["hidden"] == 16 and len(doc["weights"]) == 194 and doc["info"]["estimator"] == "PES"


def test_committed_results_agree_and_ours_beats_tuned_adam_everywhere() -> None:
    result = json.loads(RESULTS.with_suffix(".json").read_text("utf-8"))
    text = RESULTS.with_suffix(".md").read_text("utf-8")
    assert f"$ {result['command']}\n" in text
    assert "--smoke" not in result["command"]
    cfg = result["config"]
    assert cfg["horizon"] == 100 and cfg["held_out"] >= 3
    rows = [m for m in map(ROW.match, text.splitlines()) if m]
    assert len(rows) == len(result["rows"]) == 4 * cfg["held_out"]
    for m, row in zip(rows, result["rows"]):
        assert m["task"] == row["task"]
        for key, value in (("pes", row["pes"]), ("tbptt", row["tbptt"]),
                           ("tuned", row["adam_tuned"]), ("best", row["adam_best"])):  # fmt: skip
            assert m[key] == f"{value:.4g}", (row["task"], key)
        assert float(m["lr"]) == row["adam_lr"] and row["adam_lr"] in cfg["grid"]
        assert float(m["best_lr"]) == row["adam_best_lr"]
        assert row["adam_best"] <= row["adam_tuned"]
        assert row["pes"] < row["adam_tuned"], row["task"]  # the claim: ours below tuned Adam
    # one tuned lr per family: the same in every row of a family
    lrs: dict[str, set[float]] = {}
    for row in result["rows"]:
        lrs.setdefault(row["task"].split(" #")[0], set()).add(row["adam_lr"])
    assert sorted(lrs) == ["breast_cancer", "digits", "regression", "wine"]
    assert all(len(v) == 1 for v in lrs.values())
    wins = sum(r["pes"] < r["adam_tuned"] for r in result["rows"])
    assert f"Ours below tuned Adam on {wins} of {len(rows)} tasks" in text


def test_the_plugin_ships_the_weights_of_the_committed_run() -> None:
    from higher_learned_opt import pretrained_info

    result = json.loads(RESULTS.with_suffix(".json").read_text("utf-8"))
    info = pretrained_info()
    assert info["estimator"] == "PES"
    assert info["config"] == result["config"]
