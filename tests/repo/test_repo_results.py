"""The figures the READMEs quote are the ones the runs wrote, not retyped.

`python examples/maml_digits.py` (full size) writes its accuracies into
examples/results/maml_digits.json; README.md and examples/README.md must quote them as written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEMO = json.loads((ROOT / "examples" / "results" / "maml_digits.json").read_text("utf-8"))
# A row of examples/README.md's table: | 5-shot, `--seed 1` | 84.1 % ± 0.4 | 63.0 % ± 1.5 |
ROW = re.compile(r"^\| (\d)-shot([^|]*)\|([^|]+)\|([^|]+)\|$")


def test_readme_quotes_the_demo_run() -> None:
    run = DEMO["5-shot, seed 0"]
    assert run["config"]["meta_steps"] == 400 and run["config"]["test_tasks"] == 600
    readme = (ROOT / "README.md").read_text()
    assert f"({run['maml']} against {run['baseline']}, 5-way 5-shot," in readme


def test_examples_readme_table_quotes_the_runs() -> None:
    text = (ROOT / "examples" / "README.md").read_text()
    quoted = {}
    for row in filter(None, map(ROW.match, text.splitlines())):
        seed = re.search(r"seed (\d+)", row[2])  # the default seed when the row names none
        name = f"{row[1]}-shot, seed {seed[1] if seed else 0}"
        quoted[name] = (row[3].strip(), row[4].strip())
    assert quoted == {name: (run["maml"], run["baseline"]) for name, run in DEMO.items()}


def _peer_ratios() -> dict[tuple[str, str], float]:
    """(workload, contender) -> its "x peer" column in benchmarks/results/peers.md."""
    lines = (ROOT / "benchmarks" / "results" / "peers.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| workload |"))
    column = [cell.strip() for cell in header.split("|")].index("× peer")
    ratios = {}
    for line in lines:
        cells = [cell.strip() for cell in line.split("|")]
        if len(cells) > column and re.fullmatch(r"\d+\.\d+", cells[column]):
            ratios[cells[1], cells[2].strip("*")] = float(cells[column])
    return ratios


def test_readme_quotes_the_peers_run() -> None:
    ratios = _peer_ratios()
    step = "higher (this), compile_step"
    meta = "higher (this), compile_meta_step"
    tasks = "higher (this), tasks"
    compiled_steps = [ratio for (_, contender), ratio in ratios.items() if contender == step]
    quoted = [
        f"a compiled inner step takes {min(compiled_steps):.2f}–{max(compiled_steps):.2f}×",
        f"100-step unroll of a small MLP: {ratios['long', step]:.2f}×",
        f"{ratios['sine', meta]:.2f}× on 8 sine tasks and {ratios['long', meta]:.2f}× on a "
        f"100-step unroll, and batched tasks take {ratios['sine-128', tasks]:.2f}× on 128 sine",
        f"batched tasks take {ratios['conv-sgd', tasks]:.2f}× (on a CPU their forward",
        f"the compiled meta-step is slower ({ratios['conv-sgd', meta]:.2f}×)",
    ]
    mlp = ("sine", "sine-32", "long", "hpo")
    eager = [ratios[w, "higher (this)"] for w in mlp]
    adam = ratios["long-adam", "higher (this)"]
    floor = [ratios[w, "hand-written loop"] for w in mlp]
    quoted += [
        f"the eager loop takes {min(eager):.2f}–{max(eager):.2f}× the time of the fastest of "
        f"higher 0.2.1 and TorchOpt on the MLP workloads and {adam:.2f}× on a 100-step Adam "
        "unroll",
        f"the update written out) takes {min(floor):.2f}–{max(floor):.2f}×, the floor of an eager "
        "library",
    ]
    readme = " ".join((ROOT / "README.md").read_text().split())  # lines joined
    assert [phrase for phrase in quoted if phrase not in readme] == []


#: docs/fast-paths.md's names of the peers.md workloads its ratio table quotes
FAST_PATH_ROWS = {
    "sine": "sine: MLP 1→40→40→1, 8 tasks, 10 steps",
    "sine-32": "sine, 32 tasks",
    "sine-128": "sine, 128 tasks",
    "long": "long: MLP 8→32→32→1, 1 task, 100 SGD steps",
    "long-adam": "long-adam: the same, 100 Adam steps",
    "hpo": "hpo: per-parameter learning rates, 50 steps",
    "conv-sgd": "conv-sgd: 4×conv64 + BatchNorm, 4 tasks, 5 SGD steps",
    "conv-adam": "conv-adam: the same, 5 Adam steps",
}


def test_fast_paths_page_quotes_the_peers_run() -> None:
    ratios = _peer_ratios()

    def cell(workload: str, contender: str) -> str:
        ratio = ratios.get((workload, f"higher (this), {contender}"))
        return "–" if ratio is None else f"{ratio:.2f}"

    want = [
        f"| {name} | {cell(w, 'tasks')} | {cell(w, 'compile_meta_step')} |"
        for w, name in FAST_PATH_ROWS.items()
    ]
    page = (ROOT / "docs" / "fast-paths.md").read_text().splitlines()
    start = page.index("| workload | `batched_innerloop_ctx` | `compile_meta_step` |")
    assert page[start + 2 : start + 2 + len(want)] == want
    # the seconds of the first compiled meta-step, as the run measured them
    rows = json.loads((ROOT / "benchmarks" / "results" / "peers.json").read_text())["rows"]
    first = {w: r["higher (this), compile_meta_step"]["first_s"] for w, r in rows.items()}
    mlp = [s for w, s in first.items() if not w.startswith("conv")]
    conv = [first["conv-sgd"], first["conv-adam"]]
    quoted = (
        f"{min(mlp):.0f}–{max(mlp):.0f} s on the MLP workloads with torch's compile cache as the "
        f"run found it, {min(conv):.0f}–{max(conv):.0f} s on the conv net"
    )
    assert quoted in " ".join(page)


def _memory_rows() -> list[str]:
    """docs/memory-modes.md's table of what recompute keeps, from benchmarks/results/memory.json."""
    rows = json.loads((ROOT / "benchmarks" / "results" / "memory.json").read_text())["rows"]
    names = {"mem-conv": "conv MAML net", "mem-mlp": "MLP 32-256-256-1"}
    lines = []
    for workload, name in names.items():
        runs = rows[workload]
        full = runs["higher full"]["points"]
        for k, point in full.items():
            cells = [name, k, f"{point['peak_mib']:.1f}"]
            for contender in ("higher recompute", "higher recompute, every 10"):
                mib = runs[contender]["points"][k]["peak_mib"]
                cells.append(f"{mib:.1f} ({mib / point['peak_mib']:.2f}×)")
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def test_memory_modes_quotes_the_memory_run() -> None:
    page = (ROOT / "docs" / "memory-modes.md").read_text()
    for line in _memory_rows():
        assert line in page, line
    readme = (ROOT / "README.md").read_text()
    mlp = json.loads((ROOT / "benchmarks" / "results" / "memory.json").read_text())["rows"][
        "mem-mlp"
    ]
    full = mlp["higher full"]["points"]["1000"]["peak_mib"]
    recompute = mlp["higher recompute"]["points"]["1000"]["peak_mib"] / full
    every = mlp["higher recompute, every 10"]["points"]["1000"]["peak_mib"] / full
    assert f"({recompute:.2f}× at 1000 steps)" in readme
    assert f"`higher.Recompute(every=10)` {every:.2f}×" in readme


def test_long_unrolls_quotes_the_estimator_runs() -> None:
    """docs/long-unrolls.md's decision table and text quote the full runs' results files."""
    page = " ".join((ROOT / "docs" / "long-unrolls.md").read_text().split())
    results = ROOT / "examples" / "results"
    tradeoffs = json.loads((results / "estimator_tradeoffs.json").read_text())
    rows = {(r["method"], r["K"]): r for r in tradeoffs["influence_balancing"]}
    tbptt = ", ".join(f"{rows['TruncatedBackprop', k]['mean']:.0f}" for k in (1, 10, 100))
    assert f"wrong sign at `K` = 1, 10 and 100 ({tbptt.replace('-', '−')})" in page
    assert f"within {abs(rows['ES', 1000]['bias_in_stderrs']):.1f} standard errors" in page
    pes = [rows["PES", k] for k in (1, 10, 100)]
    worst = max(abs(r["bias_in_stderrs"]) for r in pes)
    assert f"within {worst:.1f} standard errors at `K` = 1, 10, 100" in page
    spread = sorted(r["std_over_seeds"] for r in pes)
    assert f"{round(spread[0], -1):.0f}–{round(spread[-1], -1):.0f} with 100 particles" in page
    assert f"about {round(rows['ES', 1000]['std_over_seeds'], -1):.0f} with 100 particles" in page
    chaos = {r["lr"]: r for r in tradeoffs["chaotic"]}[0.15]
    assert f"the exact gradient at lr = 0.15 is {chaos['backprop_grad']:+.3f}" in page
    low, high = chaos["backprop_nearby_min"], chaos["backprop_nearby_max"]
    assert f"ranges from {low:.2g} to {high:+.3g}".replace("-", "−") in page
    assert f"ES with 64 particles gives {chaos['es_mean']:.2g}".replace("-", "−") in page
    assert f"a standard error of {chaos['es_reported_stderr']:.2g}" in page
    ratio = chaos["es_seconds"] / chaos["backprop_seconds"]
    assert f"{ratio:.1f}× backprop's time per estimate" in page
    runs = json.loads((results / "chaotic_unroll.json").read_text())["meta_training"]
    assert f"reaches a learning rate of {runs['ES'][-1]['lr']:.2f}" in page
    assert f"stalls at {runs['backprop'][-1]['lr']:.2f}" in page
    balance = json.loads((results / "influence_balancing.json").read_text())
    offsets = [abs(balance["runs"][f"PES K={k}"]["tail_mean"] - balance["theta_star"])
               for k in (1, 10, 100)]  # fmt: skip
    assert f"({min(offsets):.3f} to {max(offsets):.3f} from the optimum" in page
