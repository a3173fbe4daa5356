"""The peer benchmark suite (benchmarks/peers.py) at smoke sizes, so it never rots.

Only this project and the hand-written loops (torch.func, the module's own slots) run here (the
peers need their own venvs: the full run is `nox -s bench`, by hand). The suite must produce its
table, JSON and chart, and the meta-gradients must match torch.func's (float32 and float64) on
every workload.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch.torch_version import TorchVersion

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"


def _bench(module: str) -> ModuleType:
    """A module of benchmarks/ (its scripts import each other by plain name)."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(module)
    finally:
        sys.path.remove(str(BENCH))


def _smoke_lines(script: str, timeout: int, *args: str) -> list[str]:
    """The lines a benchmark script prints at smoke sizes (`--smoke`, then `args`); it must
    succeed."""
    done = subprocess.run(
        [sys.executable, str(BENCH / script), "--smoke", *args], capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()


def test_peers_smoke_table_and_correctness(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / "peers.py"), "--smoke", "--threads", "1", "--out",
         str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "peers.md").read_text()
    assert "| workload | contender |" in table
    assert (tmp_path / "peers.png").stat().st_size > 1000
    result = json.loads((tmp_path / "peers.json").read_text())
    workloads = {"conv-sgd", "conv-adam", "sine", "sine-32", "sine-128", "long", "long-adam", "hpo"}
    assert set(result["rows"]) == workloads
    for workload, rows in result["rows"].items():
        assert set(rows) == {"higher (this)", "torch.func", "hand-written loop"}, workload
        for name in ("higher (this)", "hand-written loop"):
            row = rows[name]
            # against the float32 torch.func meta-gradient: round-off only
            assert row["max_rel_diff"] < 1e-4, (workload, name, row)
            # against float64 (tiny sizes keep even the Adam rows well conditioned)
            assert row["max_rel_diff_f64"] < 1e-3, (workload, name, row)
        for row in rows.values():
            assert row["median_ms"] > 0 and row["saved_mib"] > 0
        assert f"| {workload} | **higher (this)** |" in table
    # --render writes the same table from the run's JSON, running nothing
    again = tmp_path / "rendered"
    done = subprocess.run(
        [sys.executable, str(BENCH / "peers.py"), "--render", str(tmp_path / "peers.json"),
         "--out", str(again)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (again / "peers.md").read_text() == table


def test_by_round_ratios_take_each_rounds_fastest_peer() -> None:
    """peers.py's "by round" column: each round over that round's fastest peer, so a drift of
    the machine between rounds moves no ratio."""
    peers = _bench("peers")
    legacy, torchopt = peers.PEERS
    samples = {  # the machine twice as slow in round 2 and four times in round 3
        legacy: [1.0, 2.0, 4.8],
        torchopt: [1.2, 2.6, 4.0],
        "ours": [0.9, 1.8, 3.6],
    }
    spread = peers.by_round(samples)
    assert spread["ours"] == pytest.approx((0.9, 0.9, 0.9))
    assert spread[legacy] == pytest.approx((1.0, 1.0, 1.2))  # 1.0, 1.0, 1.2
    assert spread[torchopt] == pytest.approx((1.0, 1.2, 1.3))  # 1.2, 1.3, 1.0
    assert peers.by_round({"ours": [1.0]}) == {}  # no peer ran


@pytest.mark.skipif(
    TorchVersion(torch.__version__) < "2.3", reason="compile_step needs torch >= 2.3"
)
def test_compiled_contender_smoke(tmp_path: Path) -> None:
    """The compile_step contender (inductor) runs the workloads it accepts and its meta-gradients
    match torch.func's."""
    done = subprocess.run(
        [sys.executable, str(BENCH / "peers.py"), "--smoke", "--threads", "1", "--compiled",
         "--workloads", "conv-sgd", "long", "hpo", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "peers.json").read_text())["rows"]
    assert "higher (this), compile_step" not in rows["conv-sgd"]  # it refuses BatchNorm here
    for workload in ("long", "hpo"):
        compiled = rows[workload]["higher (this), compile_step"]
        assert compiled["max_rel_diff"] < 1e-4, (workload, compiled)
        assert compiled["max_rel_diff_f64"] < 1e-3, (workload, compiled)
        assert compiled["median_ms"] > 0


@pytest.mark.skipif(
    TorchVersion(torch.__version__) < "2.13", reason="compile_meta_step needs torch >= 2.13"
)
def test_fast_path_contenders_smoke(tmp_path: Path) -> None:
    """The batched-tasks and compile_meta_step contenders (aot_eager: what inductor
    compiles, traced in seconds) run the workloads they accept, their meta-gradients match
    torch.func's (in float64 to 1e-10, the float64 check), and the first meta-step's seconds
    are reported."""
    done = subprocess.run(
        [sys.executable, str(BENCH / "peers.py"), "--smoke", "--threads", "1", "--fast-paths",
         "--backend", "aot_eager", "--workloads", "conv-sgd", "sine-32", "long",
         "--float64-check", "conv-sgd", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "peers.json").read_text())["rows"]
    assert set(rows["conv-sgd"]) == {
        "higher (this)",
        "torch.func",
        "hand-written loop",
        "higher (this), tasks",
        "higher (this), compile_meta_step",
    }
    assert "higher (this), tasks" not in rows["long"]  # one task: nothing to batch
    for workload, name in [
        ("conv-sgd", "higher (this), tasks"),  # BatchNorm in training mode, batched: exact
        ("conv-sgd", "higher (this), compile_meta_step"),  # and compiled
        ("sine-32", "higher (this), tasks"),
        ("sine-32", "higher (this), compile_meta_step"),
        ("long", "higher (this), compile_meta_step"),
    ]:
        row = rows[workload][name]
        assert row["max_rel_diff"] < 1e-4, (workload, name, row)
        assert row["max_rel_diff_f64"] < 1e-3, (workload, name, row)
        assert row["median_ms"] > 0 and row["first_s"] > 0
    table = (tmp_path / "peers.md").read_text()
    assert "| first s |" in table and "compile_meta_step" in table
    # the float64 check: every contender of conv-sgd again in float64, against torch.func's
    checked = json.loads((tmp_path / "peers.json").read_text())["float64"]
    assert set(checked) == {"conv-sgd"} and set(checked["conv-sgd"]) == set(rows["conv-sgd"])
    assert checked["conv-sgd"]["torch.func"] == 0.0  # the reference itself, recomputed
    assert all(diff < 1e-10 for diff in checked["conv-sgd"].values()), checked
    assert "## Float64 check" in table and "| conv-sgd | **higher (this), tasks** |" in table


@pytest.mark.skipif(
    TorchVersion(torch.__version__) < "2.13", reason="compile_meta_step needs torch >= 2.13"
)
def test_meta_step_compile_time_smoke() -> None:
    lines = _smoke_lines("meta_step_compile.py", timeout=600)
    k, cold, warm, run = lines[-1].split()
    assert k == "2" and float(cold) > 0 and float(warm) > 0 and float(run) > 0


@pytest.mark.skipif(
    TorchVersion(torch.__version__) < "2.3", reason="compile_step needs torch >= 2.3"
)
def test_compiled_step_breakdown_smoke() -> None:
    lines = _smoke_lines("compiled_step.py", timeout=600)
    rows = [line.split() for line in lines[2:]]
    assert [" ".join(r[:-3]) for r in rows] == [
        "eager diffopt.step",
        "higher.compile_step",
        "torch.func + torch.compile",
    ]
    assert all(float(r[-1]) > 0 for r in rows)


@pytest.mark.parametrize(
    "args",
    [
        (),
        pytest.param(
            ("--workload", "hpo", "--compiled"),
            marks=pytest.mark.skipif(
                TorchVersion(torch.__version__) < "2.3", reason="compile_step needs torch >= 2.3"
            ),
        ),
    ],
)
def test_task_split_smoke(args: tuple[str, ...]) -> None:
    """benchmarks/task_split.py: every phase of a task, for both contenders, a positive time
    (eager sine; hpo with compile_step)."""
    lines = _smoke_lines("task_split.py", 600, *args)
    assert lines[0].startswith("hpo (compile_step):" if args else "sine:"), lines[0]
    rows = [line.rsplit(maxsplit=3) for line in lines[2:]]
    phases = ["setup", "first step", "later steps", "meta-gradient", "exit", "all"]
    assert [r[0] for r in rows] == phases
    for name, ours, hand, difference in rows:
        assert float(ours) > 0 and float(hand) > 0, name
        assert abs(float(ours) - float(hand) - float(difference)) <= 1, name  # (rounding)


def test_floor_adam_is_torch_optim_adam() -> None:
    """The Adam rows' reference (the hand-written torch.func Adam) steps as torch.optim.Adam."""
    adam_step = _bench("_peer_torchfunc").adam_step
    common = _bench("_peers_common")
    problem = common.make_problem("long", common.Sizes.smoke(), dtype=torch.float64)
    problem.lr = 0.1
    params = [p.detach().clone() for p in problem.model.parameters()]
    ours = list(params)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    leaves = [p.clone().requires_grad_() for p in params]
    opt = torch.optim.Adam(leaves, lr=problem.lr, betas=problem.betas, eps=problem.eps)
    g = torch.Generator().manual_seed(3)
    for t in range(1, 4):
        grads = [torch.randn(p.shape, generator=g, dtype=p.dtype) * 10.0**-t for p in params]
        ours, m, v = adam_step(ours, tuple(grads), m, v, t, problem)
        for leaf, grad in zip(leaves, grads):
            leaf.grad = grad
        opt.step()
    for a, b in zip(ours, leaves):
        torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-14)


def test_step_overhead_smoke(tmp_path: Path) -> None:
    """benchmarks/step_overhead.py (this project and torch.func at smoke size) writes its JSON
    and its section of peers.md: a row per contender and optimizer, with nodes per step."""
    done = subprocess.run(
        [sys.executable, str(BENCH / "step_overhead.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "step-overhead.json").read_text())["rows"]
    assert set(rows) == {f"{c}/{o}/1" for c in ("this", "torch.func") for o in ("sgd", "adam")}
    for row in rows.values():
        assert row["unroll_us"] > 0 and row["meta_us"] > row["unroll_us"]
    # the same MLP: SGD's step adds the forward's and gradient's nodes, Adam's more (its update)
    assert 0 < rows["this/sgd/1"]["nodes_per_step"] < rows["this/adam/1"]["nodes_per_step"]
    text = (tmp_path / "peers.md").read_text()
    assert text.count("## Per-step overhead") == 1
    assert "| sgd | 1 | **higher (this)** |" in text and "| adam | 1 | torch.func by hand |" in text


def test_peers_md_keeps_the_step_section(tmp_path: Path) -> None:
    """peers.py rewrites peers.md and puts back the section step_overhead.py wrote."""
    common = _bench("_peers_common")
    section = common.STEP_SECTION
    path = tmp_path / "peers.md"
    path.write_text("# Meta-gradient benchmarks\n\n| table |\n")
    common.replace_section(path, section, "rows of the first run")
    common.replace_section(path, section, "rows of the second run")  # replaced, not added
    text = path.read_text()
    assert text.startswith("# Meta-gradient benchmarks\n\n| table |\n")
    assert text.count(f"## {section}") == 1 and "first run" not in text
    kept = common.read_section(path, section)
    assert kept == "rows of the second run"
    path.write_text("# Meta-gradient benchmarks\n\n| new table |\n")  # what peers.py writes
    common.replace_section(path, section, kept)
    assert common.read_section(path, section) == "rows of the second run"
    assert "| new table |" in path.read_text()
