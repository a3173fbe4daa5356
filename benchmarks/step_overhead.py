"""Per-step overhead: microseconds per inner step of a 2-layer MLP, and autograd nodes per step.

The same inner loop (a 32-64-1 tanh MLP, batches of 64, K steps of SGD or Adam, the
meta-gradient with respect to the initial weights) under this project (eager, and with
`compile=True`), higher 0.2.1, TorchOpt 0.7.3 and a hand-written `torch.func` loop, each in its
own process (`_step_worker.py`; the peers in their own venvs). Rounds rotate the order of the
contenders so that drift of the machine cancels; each figure is the median over rounds of a
round's median. Written into benchmarks/results/peers.md (its "Per-step overhead" section,
which peers.py keeps when it rewrites the file) and step-overhead.json.

    python benchmarks/step_overhead.py --higher-021-python PY --torchopt-python PY
    python benchmarks/step_overhead.py --smoke --out /tmp/bench   # this project and torch.func
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.torch_version import TorchVersion

sys.path.insert(0, str(Path(__file__).parent))
from _peers_common import STEP_SECTION, contender_env, replace_section

HERE = Path(__file__).parent
NAMES = {
    "this": "higher (this)",
    "this-compiled": "higher (this), compile=True",
    "legacy": "higher 0.2.1",
    "torchopt": "TorchOpt 0.7.3",
    "torch.func": "torch.func by hand",
}


def run_one(python: str, library: str, optimizer: str, args: argparse.Namespace,
            threads: int) -> dict[str, Any]:  # fmt: skip
    command = [python, str(HERE / "_step_worker.py"), "--library", library, "--optimizer",
               optimizer, "--steps", str(args.steps), "--reps", str(args.reps), "--threads",
               str(threads)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=contender_env(threads),
                          timeout=900, check=False)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"{library} ({optimizer}) failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def table(rows: dict[str, dict[str, Any]], threads: list[int], steps: int) -> str:
    """The markdown of the section: one row per optimizer, thread count and contender."""
    lines = [
        f"Microseconds per inner step of a 32-64-1 tanh MLP (batches of 64, {steps} steps per "
        "inner loop, the inner loop's setup included), median over rounds; meta: the unroll "
        "and the meta-gradient with respect to the initial weights. × fastest peer: over the "
        "fastest of higher 0.2.1 and TorchOpt in the same run. Nodes: autograd nodes one inner "
        "step adds to the meta-loss's graph (a compiled step is one node). "
        "`python benchmarks/step_overhead.py`.",
        "",
        "| optimizer | threads | contender | unroll µs/step | meta µs/step | × fastest peer "
        "(meta) | nodes/step |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for optimizer in ("sgd", "adam"):
        for t in threads:
            group = {k: r for k, r in rows.items() if r["optimizer"] == optimizer
                     and r["threads"] == t}  # fmt: skip
            peers = [r["meta_us"] for r in group.values() if r["library"] in ("legacy", "torchopt")]
            best = min(peers) if peers else None
            for r in group.values():
                ratio = f"{r['meta_us'] / best:.2f}" if best else "n/a"
                name = NAMES[r["library"]]
                if r["library"].startswith("this"):
                    name = f"**{name}**"
                lines.append(
                    f"| {optimizer} | {t} | {name} | {r['unroll_us']:.0f} | {r['meta_us']:.0f} "
                    f"| {ratio} | {r['nodes_per_step']:.0f} |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--higher-021-python", help="a Python whose venv has higher==0.2.1")
    parser.add_argument("--torchopt-python", help="a Python whose venv has torchopt==0.7.3")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="tiny: one round, few steps")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.steps, args.reps, args.threads = 1, 4, 2, [1]
    contenders = [(sys.executable, "this"), (sys.executable, "torch.func")]
    if TorchVersion(torch.__version__) >= "2.3" and not args.smoke:
        contenders.append((sys.executable, "this-compiled"))
    if args.higher_021_python:
        contenders.append((args.higher_021_python, "legacy"))
    if args.torchopt_python:
        contenders.append((args.torchopt_python, "torchopt"))
    samples: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in range(args.rounds):
        for optimizer in ("sgd", "adam"):
            for t in args.threads:
                order = contenders[r % len(contenders) :] + contenders[: r % len(contenders)]
                for python, library in order:
                    out = run_one(python, library, optimizer, args, t)
                    samples.setdefault((library, optimizer, t), []).append(out)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    rows = {}
    for (library, optimizer, t), runs in samples.items():
        rows[f"{library}/{optimizer}/{t}"] = {
            "library": library,
            "optimizer": optimizer,
            "threads": t,
            "version": runs[0]["version"],
            "unroll_us": statistics.median(x["unroll_us"] for x in runs),
            "meta_us": statistics.median(x["meta_us"] for x in runs),
            "nodes_per_step": runs[0]["nodes_per_step"],
        }
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "rows": rows,
    }
    (args.out / "step-overhead.json").write_text(json.dumps(result, indent=1))
    replace_section(args.out / "peers.md", STEP_SECTION, table(rows, args.threads, args.steps))
    print(table(rows, args.threads, args.steps))


if __name__ == "__main__":
    main()
