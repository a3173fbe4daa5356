"""Memory and time of one meta-gradient against the number of inner steps k, per memory mode.

This project in each memory mode of `innerloop_ctx(..., unroll=...)` (full, recompute,
recompute keeping every 10th state, truncated to the last 10 steps, forward mode) beside
higher 0.2.1 and TorchOpt 0.7.3 (their only mode: the full graph), each in its own worker
process and venv (the machinery of peers.py), on the conv MAML net and an MLP (see
`_peers_common.MEMORY_WORKLOADS`).

Memory is the peak of the bytes held by tensor storages during one meta-gradient
(`_peers_common.tensor_peak`: every storage an op makes is counted until it is freed; on CUDA
it would equal `torch.cuda.max_memory_allocated` less the caching), not the process's RSS,
which the allocator's caching and the interpreter blur (it is reported too). Time: one run,
after a warm-up for small k (a long unroll takes minutes; on a shared machine the figures are
noisy, see the load averages in the table). The largest k that fits in 8 GiB is extrapolated
from the per-step slope between the two largest k measured (memory is affine in k for every
mode; "flat" where the slope is below 1 KiB per step).

    python benchmarks/memory.py --higher-021-python PY --torchopt-python PY   # the full run
    python benchmarks/memory.py --smoke --out /tmp/mem                        # tiny, ours only
    nox -s memory                                                             # venvs built too

Writes memory.md (the table), memory.json and memory.png under --out (benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _peers_common import MEMORY_WORKLOADS
from peers import Contender, Worker, load, log, max_rel_diff, preamble, record

HERE = Path(__file__).parent
FULL, RECOMPUTE = "higher full", "higher recompute"
EVERY, TRUNCATED, FORWARD = "higher recompute, every 10", "higher truncated, W=10", "higher forward"
LEGACY, TORCHOPT = "higher 0.2.1", "TorchOpt 0.7.3"
OURS = (FULL, RECOMPUTE, EVERY, TRUNCATED, FORWARD)
#: contender -> the workloads it runs (forward mode: hyperparameters only; the peers: MAML)
RUNS = {
    FULL: ("mem-conv", "mem-mlp", "mem-conv-hpo", "mem-mlp-hpo"),
    RECOMPUTE: ("mem-conv", "mem-mlp", "mem-conv-hpo", "mem-mlp-hpo"),
    EVERY: ("mem-conv", "mem-mlp"),
    # a truncated meta-gradient does not reach the initial weights once k > W: hyperparameters only
    TRUNCATED: ("mem-conv-hpo", "mem-mlp-hpo"),
    FORWARD: ("mem-conv-hpo", "mem-mlp-hpo"),
    LEGACY: ("mem-conv", "mem-mlp"),
    TORCHOPT: ("mem-conv", "mem-mlp"),
}
STEPS = {"mem-conv": [10, 100], "mem-conv-hpo": [10, 100], "mem-mlp": [10, 100, 1000],
         "mem-mlp-hpo": [10, 100, 1000]}  # fmt: skip
BUDGET_MIB = 8 * 1024


def contenders(args: argparse.Namespace) -> list[Contender]:
    script = "_peer_higher.py"
    found = [
        Contender(FULL, sys.executable, script),
        Contender(RECOMPUTE, sys.executable, script, ("--unroll", "recompute")),
        Contender(EVERY, sys.executable, script, ("--unroll", "recompute-10")),
        Contender(TRUNCATED, sys.executable, script, ("--unroll", "truncated-10")),
        Contender(FORWARD, sys.executable, script, ("--unroll", "forward")),
    ]
    if args.higher_021_python:
        found.append(Contender(LEGACY, args.higher_021_python, script))
    if args.torchopt_python:
        found.append(Contender(TORCHOPT, args.torchopt_python, "_peer_torchopt.py"))
    return found


def fits(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(MiB per step, largest k within the budget) from the two largest k measured."""
    (k1, m1), (k2, m2) = points[-2], points[-1]
    slope = (m2 - m1) / (k2 - k1)
    if slope < 1 / 1024:
        return slope, float("inf")
    return slope, k2 + (BUDGET_MIB - m2) / slope


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    load_before = load()
    workloads = args.workloads or list(MEMORY_WORKLOADS)
    steps = {w: ([2, 4] if args.smoke else STEPS[w]) for w in workloads}
    if args.max_steps:
        steps = {w: [k for k in ks if k <= args.max_steps] for w, ks in steps.items()}
    tmp = Path(tempfile.mkdtemp(prefix="higher-memory-"))
    rows: dict[str, dict[str, dict[str, Any]]] = {w: {} for w in workloads}
    versions: dict[str, Any] = {}
    partial = args.out / "memory.partial.json"  # what a long run has measured so far
    if args.resume and partial.exists():
        saved = json.loads(partial.read_text())
        versions = saved["versions"]
        for w, by_name in saved["rows"].items():
            if w in rows:
                rows[w].update(by_name)
    for contender in contenders(args):
        wanted = [
            w for w in workloads if w in RUNS[contender.name] and contender.name not in rows[w]
        ]
        if not wanted:
            continue
        worker = Worker(contender, args)  # one process per contender: all its k in a row
        versions[contender.name] = worker.ask(op="versions")
        for workload in wanted:
            points = []
            for k in steps[workload]:
                path = tmp / f"{workload}-{len(rows[workload])}-{k}.pt"
                answer = worker.ask(op="unroll", workload=workload, steps=k, path=str(path))
                answer["grads"] = str(path)
                points.append((k, answer))
                log(f"{contender.name:28} {workload:13} k={k:5}: {answer['peak_mib']:9.1f} MiB "
                    f"{answer['seconds']:8.2f} s (load {load()})")  # fmt: skip
            rows[workload][contender.name] = {"points": {str(k): a for k, a in points}}
            args.out.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps({"versions": versions, "rows": rows}, indent=1))
        worker.close()
    for by_name in rows.values():
        for row in by_name.values():
            ks = sorted(int(k) for k in row["points"])
            curve = [(k, row["points"][str(k)]["peak_mib"]) for k in ks]
            row["mib_per_step"], row["fits_8gib"] = fits(curve)
            ref = by_name.get(FULL)
            if ref is not None:
                for k in ks:
                    got = torch.load(row["points"][str(k)]["grads"])
                    want = torch.load(ref["points"][str(k)]["grads"])
                    row["points"][str(k)]["max_rel_diff"] = max_rel_diff(got, want)
    return record(started, load_before, args, versions, rows=rows)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b > 0 else "–"


def table(result: dict[str, Any]) -> str:
    lines = [
        *preamble(
            result,
            "Memory of one meta-gradient against the number of inner steps",
            " (a shared machine: times are noisy)",
        ),
        "Peak: MiB held by tensor storages during one meta-gradient (every storage counted from "
        "the op that makes it until it is freed); RSS: growth of the process's peak RSS during "
        "the timed run. × full: over this project's full mode at the same k. Fits in 8 GiB: "
        "the largest k whose extrapolated peak (per-step slope between the two largest k) stays "
        "under 8 GiB; ∞: memory flat in k. Rel. diff: max |g − g_full| / max |g_full| of the "
        "meta-gradient (float32; truncated is an approximation by design).",
        "",
        "| workload | contender | k | peak MiB | × full | RSS MiB | time s | × full | "
        "MiB/step | fits in 8 GiB | rel. diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for workload, by_name in result["rows"].items():
        full = by_name.get(FULL)
        for name, row in by_name.items():
            bold = "**" if name in OURS else ""
            for k, p in row["points"].items():
                ref = full["points"].get(k) if full else None
                fit = row["fits_8gib"]
                lines.append(
                    f"| {workload} | {bold}{name}{bold} | {k} | {p['peak_mib']:.1f} "
                    f"| {_ratio(p['peak_mib'], ref['peak_mib']) if ref else '–'} "
                    f"| {p['rss_delta_mib']:.0f} | {p['seconds']:.2f} "
                    f"| {_ratio(p['seconds'], ref['seconds']) if ref else '–'} "
                    f"| {row['mib_per_step']:.3f} "
                    f"| {'∞' if fit == float('inf') else f'{fit:,.0f}'} "
                    f"| {p.get('max_rel_diff', float('nan')):.1e} |"
                )
    lines += ["", "Workloads:", ""]
    lines += [f"- {w}: {MEMORY_WORKLOADS[w]}" for w in result["rows"]]
    lines += [
        "",
        "Largest k that fits in 8 GiB (extrapolated from the measured per-step slope):",
        "",
    ]
    names = list(dict.fromkeys(n for rows in result["rows"].values() for n in rows))
    lines.append("| contender | " + " | ".join(result["rows"]) + " |")
    lines.append("|---|" + "---:|" * len(result["rows"]))
    for name in names:
        cells = []
        for rows in result["rows"].values():
            fit = rows.get(name, {}).get("fits_8gib")
            cells.append("–" if fit is None else "∞" if fit == float("inf") else f"{fit:,.0f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(result["rows"])
    fig, axes = plt.subplots(2, len(workloads), figsize=(4.2 * len(workloads), 7), squeeze=False)
    for col, workload in enumerate(workloads):
        for name, row in result["rows"][workload].items():
            ks = sorted(int(k) for k in row["points"])
            style = "-o" if name in OURS else "--s"
            for r, key in enumerate(("peak_mib", "seconds")):
                values = [row["points"][str(k)][key] for k in ks]
                axes[r][col].plot(ks, values, style, label=name, markersize=4)
        for r, label in enumerate(("peak MiB held by tensors", "seconds")):
            ax = axes[r][col]
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("inner steps k")
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
        axes[0][col].set_title(workload, fontsize=10)
        axes[0][col].axhline(BUDGET_MIB, color="grey", linewidth=0.8, linestyle=":")
        axes[0][col].legend(fontsize=7)
    m, a = result["machine"], result["args"]
    fig.suptitle(f"one meta-gradient vs k — {m['cpu']}, {a['threads']} threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--higher-021-python", help="a Python whose venv has higher==0.2.1")
    parser.add_argument("--torchopt-python", help="a Python whose venv has torchopt==0.7.3")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every process")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, k = 2 and 4")
    parser.add_argument("--max-steps", type=int, help="leave out larger k")
    parser.add_argument("--workloads", nargs="+", choices=list(MEMORY_WORKLOADS))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument(
        "--resume", action="store_true", help="keep what memory.partial.json holds (same sizes)"
    )
    args = parser.parse_args()
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(result)
    (args.out / "memory.md").write_text(text)
    (args.out / "memory.json").write_text(json.dumps(result, indent=1))
    chart(result, args.out / "memory.png")
    (args.out / "memory.partial.json").unlink(missing_ok=True)
    print(text)


if __name__ == "__main__":
    main()
