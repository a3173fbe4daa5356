"""One implicit hypergradient, side by side: this project's `higher.implicit` vs TorchOpt 0.7.3's
`torchopt.diff.implicit.custom_root`, on the same problems (see `_implicit_common.WORKLOADS`).

Each contender computes d validation loss / d log-penalties at the same inner solution (found
beforehand in float64 and cast), with the same linear solver settings, in its own worker process
(TorchOpt in its own venv), with the same torch thread count. Timing rounds alternate the
contenders (their order rotates every round) and the table reports medians. Memory: the peak RSS
of one hypergradient in a fresh worker (and its growth over the RSS before it), and the MiB of
unique storages saved for backward. Error: max |g - g_ref| / max |g_ref| against the closed-form
implicit formula in float64. The worker machinery is `peers.py`'s.

    python benchmarks/implicit.py --torchopt-python PY     # the full run
    python benchmarks/implicit.py --smoke --out /tmp/bench  # tiny, one round, this project only
    nox -s bench                                            # venvs built too

Writes implicit.md (the table) and implicit.json under --out (benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _implicit_common import SPECS, WORKLOADS, make, reference
from peers import Contender, Worker, fmt, load, log, preamble, record

import higher
from higher.implicit import hypergrad

HERE = Path(__file__).parent
HYPERGRAD, ROOT = "higher (this): hypergrad", "higher (this): custom_root"
TORCHOPT = "TorchOpt 0.7.3: custom_root"
TORCHOPT_NORMAL = "TorchOpt 0.7.3: custom_root, solve_normal_cg (its default)"
#: hypergradients per round and contender: their mean is the round's figure
REPS = {"ridge-cg": 3, "logistic-cg": 3, "ridge-direct": 2}


def runs(contender: str, workload: str) -> bool:
    """solve_normal_cg is a CG: it sits out the dense-solve workload."""
    return not (contender == TORCHOPT_NORMAL and SPECS[workload].solver != "cg")


def rel_err(got: list[torch.Tensor], ref: torch.Tensor) -> float:
    return float((got[0].to(torch.float64) - ref).abs().max() / ref.abs().max())


def our_solves(workloads: list[str], smoke: bool) -> dict[str, dict[str, Any]]:
    """This project's SolveResult on each workload: what the solve took, for the table."""
    sys.path.insert(0, str(HERE))
    from _implicit_higher import solver_of

    out = {}
    for workload in workloads:
        problem = make(workload, smoke, "cpu")
        solve = hypergrad(problem.inner, problem.outer, problem.theta, problem.h,
                          solver=solver_of(problem)).solves[0]  # fmt: skip
        out[workload] = {
            "method": solve.method,
            "iterations": solve.iterations,
            "matvecs": solve.matvecs,
            "relative_residual": solve.relative_residual,
        }
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    contenders = [
        Contender(HYPERGRAD, sys.executable, "_implicit_higher.py", ("--variant", "hypergrad")),
        Contender(ROOT, sys.executable, "_implicit_higher.py", ("--variant", "custom_root")),
    ]
    if args.torchopt_python:
        contenders += [
            Contender(TORCHOPT, args.torchopt_python, "_implicit_torchopt.py"),
            Contender(
                TORCHOPT_NORMAL,
                args.torchopt_python,
                "_implicit_torchopt.py",
                ("--variant", "normal"),
            ),
        ]
    workloads = args.workloads or list(WORKLOADS)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    load_before = load()
    refs = {w: reference(w, args.smoke) for w in workloads}  # also solves and caches the problems
    solves = our_solves(workloads, args.smoke)
    log("problems solved and cached")

    # ---- timing: all workers alive, taking turns ----------------------------------------------
    workers = [Worker(c, args) for c in contenders]
    versions = {w.name: w.ask(op="versions") for w in workers}
    samples: dict[str, dict[str, list[float]]] = {
        w: {c.name: [] for c in contenders if runs(c.name, w)} for w in workloads
    }
    for r in range(args.rounds):
        for k, workload in enumerate(workloads):
            shift = (r + k) % len(workers)
            for worker in workers[shift:] + workers[:shift]:
                if runs(worker.name, workload):
                    reps = 1 if args.smoke else REPS[workload]
                    answer = worker.ask(op="time", workload=workload, reps=reps)
                    samples[workload][worker.name].append(answer["seconds"])
        log(f"round {r + 1}/{args.rounds} done (load {load()})")

    # ---- memory and hypergradients: a fresh worker per contender and workload -----------------
    tmp = Path(tempfile.mkdtemp(prefix="higher-implicit-"))
    memory: dict[str, dict[str, dict[str, float]]] = {w: {} for w in workloads}
    errors: dict[str, dict[str, float]] = {w: {} for w in workloads}
    for workload in workloads:
        for c, timing_worker in zip(contenders, workers):
            if not runs(c.name, workload):
                continue
            worker = timing_worker if args.smoke else Worker(c, args)
            path = tmp / f"{workload}-{len(errors[workload])}.pt"
            memory[workload][c.name] = worker.ask(op="memory", workload=workload, path=str(path))
            if worker is not timing_worker:
                worker.close()
            errors[workload][c.name] = rel_err(torch.load(path), refs[workload])
        log(f"memory and hypergradients of {workload} done")
    for worker in workers:
        worker.close()

    rows: dict[str, dict[str, dict[str, float]]] = {}
    for workload in workloads:
        med = {c: statistics.median(s) for c, s in samples[workload].items()}
        rows[workload] = {
            name: {
                "median_ms": med[name] * 1e3,
                "best_ms": min(samples[workload][name]) * 1e3,
                "vs_torchopt": med[name] / med[TORCHOPT] if TORCHOPT in med else float("nan"),
                **memory[workload][name],
                "rel_err": errors[workload][name],
            }
            for name in med
        }
    return record(
        started, load_before, args, versions, our_solves=solves, samples=samples, rows=rows
    )


def table(result: dict[str, Any]) -> str:
    lines = [
        *preamble(result, "One implicit hypergradient: higher.implicit vs TorchOpt"),
        "Time: median milliseconds of one hypergradient at a given inner solution (the linear "
        "solve with Hessian-vector products and the vector-Jacobian products around it), each "
        "round's figure the mean of a few back-to-back ones after an untimed one; best: the "
        "fastest round. × TorchOpt: over TorchOpt's custom_root with the same solver and "
        "settings. RSS: peak during one hypergradient in a fresh process (+growth over the "
        "RSS before it, which holds the data). Saved: MiB of unique storages saved for "
        "backward (– where torch.func.grad, which the custom_root rows' optimality condition "
        "uses, refuses the hooks that count them). Error: max |g - g_ref| / max |g_ref| "
        "against the closed-form implicit formula in float64 (the float32 rows are bounded by "
        "float32 itself).",
        "",
        "| workload | contender | time ms | best ms | × TorchOpt | peak RSS MiB (+growth) "
        "| saved MiB | error vs closed form |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for workload, rows in result["rows"].items():
        for name, r in rows.items():
            bold = "**" if name.startswith("higher") else ""
            lines.append(
                f"| {workload} | {bold}{name}{bold} | {r['median_ms']:.1f} | {r['best_ms']:.1f} "
                f"| {fmt(r['vs_torchopt'], '.2f')} "
                f"| {r['rss_peak_mib']:.0f} ({r['rss_delta_mib']:+.0f}) "
                f"| {fmt(r['saved_mib'], '.1f')} "
                f"| {r['rel_err']:.1e} |"
            )
    lines += ["", "This project's solve on each workload (its SolveResult):", ""]
    for workload, s in result["our_solves"].items():
        lines.append(
            f"- {workload}: {s['method']}, {s['iterations']} iteration(s), {s['matvecs']} "
            f"Hessian-vector products, relative residual {s['relative_residual']:.1e}"
        )
    lines += ["", "Workloads:", ""]
    lines += [f"- {w}: {WORKLOADS[w]}" for w in result["rows"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--torchopt-python", help="a Python whose venv has torchopt==0.7.3")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every process")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if args.smoke:
        args.rounds = 1
    torch.set_num_threads(args.threads)
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(result)
    (args.out / "implicit.md").write_text(text)
    (args.out / "implicit.json").write_text(json.dumps(result, indent=1))
    print(text)
    print(f"higher {higher.__version__}: wrote {args.out / 'implicit.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
