"""Meta-gradients side by side: this project vs higher 0.2.1, TorchOpt 0.7.3 and torch.func.

Every contender computes the same second-order meta-gradient of the same workload (see
`_peers_common.WORKLOADS`) in its own worker process (the peers in their own venvs), with the
same torch thread count. Timing rounds alternate the contenders (their order rotates every
round) so machine drift cancels; the table reports medians. Memory is measured in a fresh
worker per contender and workload: the peak RSS of one meta-step (and its growth over the RSS
before it), and the MiB of unique storages saved for backward. Correctness: the max absolute
difference of each meta-gradient from the float32 torch.func one (torch.optim-exact Adam),
divided by the reference's largest magnitude; and the same against torch.func in float64.

    python benchmarks/peers.py --higher-021-python PY --torchopt-python PY   # the full run
    python benchmarks/peers.py --smoke --out /tmp/bench                      # tiny, one round
    nox -s bench                                                             # venvs built too

Writes peers.md (the table), peers.json and peers.png under --out (benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _peers_common import (
    STEP_SECTION,
    WORKLOADS,
    contender_env,
    read_section,
    replace_section,
)

HERE = Path(__file__).parent
OURS, FLOOR, LEGACY, TORCHOPT = "higher (this)", "torch.func", "higher 0.2.1", "TorchOpt 0.7.3"
#: the weights in the module's own slots, no library: the floor of an eager library
SLOTS = "hand-written loop"
COMPILED = "higher (this), compile_step"
BATCHED = "higher (this), tasks"
META = "higher (this), compile_meta_step"
OURS_ALL = (OURS, COMPILED, BATCHED, META)
PEERS = (LEGACY, TORCHOPT)  # the libraries the targets compare against
#: the workloads a contender sits out: compile_step refuses BatchNorm with batch statistics;
#: batching tasks does nothing for a workload of one task
SKIPS = {COMPILED: ("conv-sgd", "conv-adam"), BATCHED: ("long", "hpo", "long-adam")}
#: seconds per meta-step are averaged over this many back-to-back steps per round
REPS = {"conv-sgd": 1, "conv-adam": 1, "sine": 3, "sine-32": 1, "sine-128": 1, "long": 2,
        "hpo": 3, "long-adam": 2}  # fmt: skip


@dataclass
class Contender:
    name: str
    python: str
    script: str
    flags: tuple[str, ...] = ()


class Worker:
    """One contender's worker process, asked one JSON request at a time."""

    def __init__(self, contender: Contender, args: argparse.Namespace) -> None:
        command = [contender.python, str(HERE / contender.script), "--threads", str(args.threads)]
        command += ["--device", args.device, *contender.flags] + (["--smoke"] if args.smoke else [])
        self.name = contender.name
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=contender_env(args.threads),
        )

    def ask(self, **request: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} worker died answering {request}")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"{self.name}: {answer['error']}")
        return answer

    def close(self) -> None:
        self.ask(op="quit")
        self.proc.wait(timeout=60)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform()}


def load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def record(
    started: str,
    load_before: str,
    args: argparse.Namespace,
    versions: dict[str, Any],
    **fields: Any,
) -> dict[str, Any]:
    """A run's result: when and where it ran (the load before and now), its arguments and the
    contenders' versions, then `fields`."""
    return {
        "started": started,
        "machine": machine(),
        "load_before": load_before,
        "load_after": load(),
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "versions": versions,
        **fields,
    }


def preamble(result: dict[str, Any], title: str, note: str = "") -> list[str]:
    """A results table's first lines: its title, where and how it ran, the versions."""
    m, a = result["machine"], result["args"]
    rounds = f", {a['rounds']} rounds" if "rounds" in a else ""
    return [
        f"# {title}",
        "",
        f"Run {result['started']} on {m['cpu']} ({m['cores']} cores visible), device "
        f"{a['device']}, {a['threads']} torch threads in every process{rounds}"
        f"{' (smoke sizes)' if a['smoke'] else ''}; load average before/after: "
        f"{result['load_before']} / {result['load_after']}{note}.",
        "",
        "Versions: "
        + "; ".join(
            f"{name}: {v['library']} (torch {v['torch']}, Python {v['python']})"
            for name, v in result["versions"].items()
        ),
        "",
    ]


def fmt(x: float, spec: str) -> str:
    """`x` formatted, or a dash where it is NaN (no such contender in this run)."""
    return "–" if x != x else format(x, spec)


def by_round(samples: dict[str, list[float]]) -> dict[str, tuple[float, float, float]]:
    """Per contender, its time over the fastest peer's in the same round (the contenders of a
    round run one after another, so a drift of the machine's speed between rounds falls on
    both): the lower quartile, median and upper quartile over the rounds. Empty where no peer
    ran."""
    peers = [samples[p] for p in PEERS if p in samples]
    if not peers:
        return {}
    fastest = [min(times) for times in zip(*peers)]
    spread = {}
    for name, times in samples.items():
        ratios = sorted(t / f for t, f in zip(times, fastest))
        q1, q3 = statistics.quantiles(ratios, n=4)[::2] if len(ratios) > 1 else (ratios[0],) * 2
        spread[name] = (q1, statistics.median(ratios), q3)
    return spread


def max_rel_diff(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    a = torch.cat([g.flatten() for g in got])
    b = torch.cat([r.flatten() for r in ref])
    return float((a - b).abs().max() / b.abs().max())


def run(args: argparse.Namespace) -> dict[str, Any]:
    contenders = [
        Contender(OURS, sys.executable, "_peer_higher.py"),
        Contender(FLOOR, sys.executable, "_peer_torchfunc.py"),
        Contender(SLOTS, sys.executable, "_peer_torchfunc.py", ("--variant", "slots")),
    ]
    backend = ("--backend", args.backend)
    if args.compiled:
        contenders.append(Contender(COMPILED, sys.executable, "_peer_higher.py", ("--compiled",)))
    if args.fast_paths:
        contenders.append(Contender(BATCHED, sys.executable, "_peer_higher.py", ("--batched",)))
        contenders.append(
            Contender(META, sys.executable, "_peer_higher.py", ("--meta-step", *backend))
        )
    if args.higher_021_python:
        contenders.append(Contender(LEGACY, args.higher_021_python, "_peer_higher.py"))
    if args.torchopt_python:
        contenders.append(Contender(TORCHOPT, args.torchopt_python, "_peer_torchopt.py"))
    workloads = args.workloads or list(WORKLOADS)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    load_before = load()

    # ---- timing: all workers alive, taking turns ----------------------------------------------
    workers = [Worker(c, args) for c in contenders]
    versions = {w.name: w.ask(op="versions") for w in workers}

    def runs(name: str, workload: str) -> bool:
        return workload not in SKIPS.get(name, ())

    samples: dict[str, dict[str, list[float]]] = {
        w: {c.name: [] for c in contenders if runs(c.name, w)} for w in workloads
    }
    first: dict[str, dict[str, float]] = {w: {} for w in workloads}
    for r in range(args.rounds):
        for k, workload in enumerate(workloads):
            shift = (r + k) % len(workers)
            for worker in workers[shift:] + workers[:shift]:
                if not runs(worker.name, workload):
                    continue
                reps = 1 if args.smoke else REPS[workload]
                answer = worker.ask(op="time", workload=workload, reps=reps)
                samples[workload][worker.name].append(answer["seconds"])
                first[workload][worker.name] = answer["first_s"]
        log(f"round {r + 1}/{args.rounds} done (load {load()})")

    # ---- memory and meta-gradients: a fresh worker per contender and workload -----------------
    # (--smoke asks the timing workers instead: quicker, and tiny sizes say nothing of memory)
    tmp = Path(tempfile.mkdtemp(prefix="higher-peers-"))
    memory: dict[str, dict[str, dict[str, float]]] = {w: {} for w in workloads}
    grads: dict[str, dict[str, list[torch.Tensor]]] = {w: {} for w in workloads}
    for workload in workloads:
        for c, timing_worker in zip(contenders, workers):
            if not runs(c.name, workload):
                continue
            worker = timing_worker if args.smoke or args.same_process_memory else Worker(c, args)
            path = tmp / f"{workload}-{len(grads[workload])}.pt"
            memory[workload][c.name] = worker.ask(op="memory", workload=workload, path=str(path))
            if worker is not timing_worker:
                worker.close()
            grads[workload][c.name] = torch.load(path)
        log(f"memory and gradients of {workload} done")
    refs: dict[str, list[torch.Tensor]] = {}
    for workload in workloads:  # torch.func in float64
        path = tmp / f"{workload}-ref.pt"
        workers[1].ask(op="grad", workload=workload, path=str(path), dtype="float64")
        refs[workload] = torch.load(path)
    # every contender in float64 where asked: is a float32 difference round-off the workload
    # amplifies (float64 agrees with the reference) or another computation (it does not)?
    float64: dict[str, dict[str, float]] = {}
    for workload in args.float64_check or ():
        float64[workload] = {}
        for worker in workers:
            if runs(worker.name, workload):
                path = tmp / f"{workload}-{worker.name}-f64.pt".replace(" ", "_")
                worker.ask(op="grad", workload=workload, path=str(path), dtype="float64")
                float64[workload][worker.name] = max_rel_diff(torch.load(path), refs[workload])
        log(f"float64 check of {workload} done")
    for worker in workers:
        worker.close()

    rows: dict[str, dict[str, dict[str, float]]] = {}
    for workload in workloads:
        med = {c: statistics.median(s) for c, s in samples[workload].items()}
        peers = [med[p] for p in PEERS if p in med]
        rows[workload] = {}
        for name in med:
            spread = max(samples[workload][name]) - min(samples[workload][name])
            rows[workload][name] = {
                "median_ms": med[name] * 1e3,
                "spread_ms": spread * 1e3,
                "best_ms": min(samples[workload][name]) * 1e3,
                "first_s": first[workload][name],
                "vs_fastest_peer": med[name] / min(peers) if peers else float("nan"),
                "vs_floor": med[name] / med[FLOOR],
                **memory[workload][name],
                "max_rel_diff": max_rel_diff(grads[workload][name], grads[workload][FLOOR]),
                "max_rel_diff_f64": max_rel_diff(grads[workload][name], refs[workload]),
            }
    return record(started, load_before, args, versions, samples=samples, rows=rows,
                  float64=float64)  # fmt: skip


def table(result: dict[str, Any]) -> str:
    lines = [
        *preamble(result, "Meta-gradient benchmarks against the peers"),
        "Time: median milliseconds of one meta-iteration (inner loops of every task, second order, "
        "and the meta-gradient), each round's figure the mean of a few back-to-back meta-steps "
        "after an untimed one; best: the fastest round. × peer: over the fastest of higher 0.2.1 "
        "and TorchOpt in this run; "
        "× floor: over hand-written torch.func. hand-written loop: the weights put in the "
        "module's own parameter slots and the module called, `torch.autograd.grad` and the "
        "update written out (what TorchOpt does, with no library around it), the floor of an "
        "eager library on these workloads. RSS: peak of one meta-step in a fresh process "
        "(+growth during it). Saved: MiB of unique storages saved for backward during the step. "
        "Max rel. diff: max |g - g_ref| / max |g_ref| against the float32 torch.func meta-gradient "
        "(the reference row; Adam rows: torch.optim-exact Adam); vs f64: against torch.func in "
        "float64, which measures how well conditioned the workload is in float32 as much as the "
        "contender (an Adam meta-gradient is not: entries whose gradient falls near eps get "
        "derivatives of order lr / eps, and which entries do depends on round-off). First s: "
        "seconds of the contender's first meta-step in its timing process (building, and for "
        "the compiled contenders compiling, on torch's on-disk compile cache as the run found "
        "it); no timing includes it. By round: each round's time over the fastest peer's in "
        "the same round, the median over the rounds and, in brackets, the middle half of them "
        "(lower to upper quartile): how far the machine's drift moves the ratio.",
        "",
        "| workload | contender | time ms | best ms | × peer | by round | × floor | first s "
        "| peak RSS MiB (+growth) | saved MiB | max rel. diff | vs f64 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if any(BATCHED in rows or META in rows for rows in result["rows"].values()):
        lines[-3:-3] = [
            f"{BATCHED}: every task of a workload at once with `higher.batched_innerloop_ctx` "
            "(fast weights stacked per task, the update vmapped; the forward vmapped, or for "
            "the conv nets on a CPU, as `batching='auto'` chooses, looped over tasks; BatchNorm "
            f"in training mode exact); it sits out the one-task workloads. {META}: the whole "
            "meta-step "
            "(every inner step, every task, the outer loss) one graph of "
            f"`higher.compile_meta_step` ({result['args'].get('backend', 'inductor')}).",
            "",
        ]
    if any(COMPILED in rows for rows in result["rows"].values()):
        lines[-3:-3] = [
            f"{COMPILED}: the same user code with each inner step made by `higher.compile_step` "
            "(compiled in a warm-up that no measurement includes; peak RSS includes the "
            "compiler). It sits out the conv workloads: it refuses BatchNorm with batch "
            "statistics, whose compiled second-order gradient torch gets wrong.",
            "",
        ]
    for workload, rows in result["rows"].items():
        spread = by_round(result["samples"][workload])
        for name, r in rows.items():
            bold = "**" if name in OURS_ALL else ""
            q1, median, q3 = spread.get(name, (math.nan,) * 3)
            rounds = "–" if median != median else f"{median:.2f} ({q1:.2f}–{q3:.2f})"
            lines.append(
                f"| {workload} | {bold}{name}{bold} | {r['median_ms']:.1f} | {r['best_ms']:.1f} "
                f"| {fmt(r['vs_fastest_peer'], '.2f')} | {rounds} | {r['vs_floor']:.2f} "
                f"| {r.get('first_s', float('nan')):.1f} "
                f"| {r['rss_peak_mib']:.0f} ({r['rss_delta_mib']:+.0f}) | {r['saved_mib']:.1f} "
                f"| {'reference' if name == FLOOR else format(r['max_rel_diff'], '.1e')} "
                f"| {r['max_rel_diff_f64']:.1e} |"
            )
    lines += ["", "Workloads:", ""]
    lines += [f"- {w}: {WORKLOADS[w]}" for w in result["rows"]]
    lines += float64_table(result)
    return "\n".join(lines) + "\n"


def float64_table(result: dict[str, Any]) -> list[str]:
    """The float64 check (`--float64-check`), as lines of markdown (none if not run)."""
    checked = result.get("float64") or {}
    if not checked:
        return []
    lines = [
        "",
        "## Float64 check",
        "",
        "Each contender's meta-gradient computed in float64 (the same workload, data and "
        "initial weights), against torch.func in float64: max |g - g_ref| / max |g_ref|, next "
        "to the float32 figure of the table above. Where float64 agrees and float32 does not, "
        "the float32 difference is round-off that the workload amplifies, not a different "
        "computation.",
        "",
        "| workload | contender | float64 vs f64 | float32 vs f64 |",
        "|---|---|---:|---:|",
    ]
    for workload, diffs in checked.items():
        for name, diff in diffs.items():
            bold = "**" if name in OURS_ALL else ""
            f32 = result["rows"][workload][name]["max_rel_diff_f64"]
            lines.append(f"| {workload} | {bold}{name}{bold} | {diff:.1e} | {f32:.1e} |")
    return lines


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 0.0


def chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(result["rows"])
    names = list(dict.fromkeys(n for rows in result["rows"].values() for n in rows))
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(workloads), 4.2))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [  # 0: sits this workload out, or no peer ran (--smoke without peers)
            _finite(result["rows"][w].get(name, {}).get("vs_fastest_peer", 0.0)) for w in workloads
        ]
        xs = [k + (i - (len(names) - 1) / 2) * width for k in range(len(workloads))]
        ax.bar(xs, values, width, label=name)
        for x, value in zip(xs, values):
            if not value:  # this contender sits this workload out
                ax.text(x, 0.02, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(workloads)), workloads)
    ax.set_ylabel("median time / fastest of higher 0.2.1 and TorchOpt")
    m, a = result["machine"], result["args"]
    ax.set_title(f"{m['cpu']}, {a['threads']} threads, {a['device']}", fontsize=9)
    top = max(
        _finite(r.get("vs_fastest_peer", 0.0))
        for rows in result["rows"].values()
        for r in rows.values()
    )
    top = top or 1.0
    ax.set_ylim(0, top * 1.35)  # room for the legend above the bars
    ax.legend(fontsize=8, loc="upper left", ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--higher-021-python", help="a Python whose venv has higher==0.2.1")
    parser.add_argument("--torchopt-python", help="a Python whose venv has torchopt==0.7.3")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every process")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round")
    parser.add_argument(
        "--compiled", action="store_true", help="add this project with higher.compile_step"
    )
    parser.add_argument(
        "--fast-paths",
        action="store_true",
        help="add this project's fast paths: batched tasks and compile_meta_step",
    )
    parser.add_argument(
        "--backend", default="inductor", help="torch.compile backend of compile_meta_step"
    )
    parser.add_argument(
        "--same-process-memory",
        action="store_true",
        help="memory and meta-gradients from the timing workers (quicker: no fresh process, "
        "no second compile; the RSS figures then include what earlier steps left)",
    )
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS))
    parser.add_argument(
        "--float64-check",
        nargs="+",
        choices=list(WORKLOADS),
        help="these workloads' meta-gradients once more in float64, every contender, against "
        "torch.func in float64 (the compiled contenders compile again)",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="run nothing: write the table and chart of an earlier run's peers.json into --out",
    )
    args = parser.parse_args()
    if args.smoke:
        args.rounds = 1
    unrun = set(args.float64_check or ()) - set(args.workloads or WORKLOADS)
    if unrun:
        parser.error(f"--float64-check {' '.join(sorted(unrun))}: not among --workloads")
    result = json.loads(args.render.read_text()) if args.render else run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(result)
    # the per-step section is step_overhead.py's: kept as that run wrote it
    kept = read_section(args.out / "peers.md", STEP_SECTION)
    (args.out / "peers.md").write_text(text)
    replace_section(args.out / "peers.md", STEP_SECTION, kept)
    (args.out / "peers.json").write_text(json.dumps(result, indent=1))
    chart(result, args.out / "peers.png")
    print(text)


if __name__ == "__main__":
    main()
